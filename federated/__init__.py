"""Federated training: group clients, FedAvg aggregation and the in-process engine."""
