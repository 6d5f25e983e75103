"""Survey data as tensors: loaders, embeddings, episodes (method.md §1, §2, §4, §9)."""
