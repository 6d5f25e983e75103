"""The top layer: from flags to finished run folders.

Imports point one way: models, data_loaders, utils <- training (local steps, evaluation,
configs) <- federated (clients, aggregation, strategies, engines) <- flower_app (the Flower
engine) <- orchestration (flags, the run loop, resume, the centralized baseline, and the wiring
of the Flower ServerApp) <- reporting, inference, scripts, benchmarks.
"""
