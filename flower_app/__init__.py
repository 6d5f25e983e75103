"""PluralLLM on Flower: the same FedAvg experiment with every group on its own SuperNode.

protocol (the wire format), node and client_app (the ClientApp side), federation (node discovery,
FlowerTrainer), secagg* (SecAgg+), loopback (a deployment on 127.0.0.1). The ServerApp and the
simulation are in orchestration/, since they build the run loop. Deployment: docs/federation.md.
"""
