"""PluralLLM on Flower: the same FedAvg experiment with every group on its own SuperNode (docs/federation.md).
The ServerApp and the simulation are in orchestration/, since they build the run loop."""
