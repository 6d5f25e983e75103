"""Seeds derived from (seed, purpose, names...), never from process or message order, so a client's
episodes in round r are the same in any process, after a resume, or in any client order."""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on `seed` and `parts` (stable across processes)."""
    text = "/".join([str(seed), *map(str, parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def generator(seed: int, *parts: object, device: str | torch.device = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(seed, *parts))


def seed_everything(seed: int) -> None:
    """Global RNGs too, for library code that draws from them (e.g. init of new modules)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
