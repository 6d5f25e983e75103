"""PluralLLM on Flower: the same FedAvg experiment with every group on its own SuperNode.

    protocol.py    what crosses the wire: weights, counts, losses, per-question distances
    node.py        the client side: one node, one group, the in-process engine's GroupClient
    client_app.py  the ClientApp (Message API) around node.py
    federation.py  the server side: find the groups' nodes, FlowerTrainer (FedAvgTrainer's
                   interface and FedAvg round, its clients fitted over the Grid)
    secagg.py      the `--secagg` settings and their validation (no flwr needed)
    secagg_client.py, secagg_server.py
                   Flower's SecAgg+ around the node's train handler and the FlowerTrainer
    loopback.py    a SuperLink and one SuperNode per group on 127.0.0.1, for tests, the
                   benchmark and trying a deployment on one machine

The ServerApp and the simulation runtime that `main_fl.py --engine flower` starts live in
orchestration/flower_server.py and orchestration/flower_simulation.py: they build the run
loop and run folder, which this package may not import. Commands for a real deployment
(SuperLink, one SuperNode per group, `flwr run`): docs/federation.md.
"""
