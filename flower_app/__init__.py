"""PluralLLM on Flower: the same FedAvg experiment with every group on its own SuperNode.

    protocol.py    what crosses the wire: weights, counts, losses, per-question distances
    node.py        the client side: one node, one group, the in-process engine's GroupClient
    client_app.py  the ClientApp (Message API) around node.py
    federation.py  the server side: find the groups' nodes, FlowerTrainer (FedAvgTrainer's
                   interface and FedAvg round, its clients fitted over the Grid)
    server_app.py  the ServerApp: builds the same run loop and run folder as main_fl.py
    simulation.py  `main_fl.py --engine flower`: the two apps on Flower's simulation runtime
                   (thread backend, or Flower's Ray backend)
    loopback.py    a SuperLink and one SuperNode per group on 127.0.0.1, for tests, the
                   benchmark and trying a deployment on one machine

Commands for a real deployment (SuperLink, one SuperNode per group, `flwr run`):
docs/federation.md.
"""
