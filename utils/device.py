"""--device auto|cpu|cuda[:N] (and --emb_device): one resolution, one error message."""
from __future__ import annotations

import torch

from utils.errors import DataError


def resolve_device(name: str, flag: str = "--device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DataError(f"{flag} {name}: this PyTorch build sees no CUDA device "
                            f"(torch {torch.__version__})",
                            f"use {flag} cpu, or {flag} auto to pick CUDA only when present")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise DataError(f"{flag} {name!r} is not one of auto, cpu, cuda, cuda:N", f"use {flag} auto")
