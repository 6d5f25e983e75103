"""Communication cost: the payload bytes of the messages flower_app/protocol.py sends in a round, by Flower's
own `count_bytes` rule; protobuf framing (bounded in tests/test_comm.py) and the setup string repeated in every
instruction are left out. Every engine calls these functions, so all report the same numbers for the same run."""
from __future__ import annotations

import functools
import io
import json
from collections.abc import Mapping, Sequence

import numpy as np
import torch

NUMBER_BYTES = 8  # a float64 or int64 scalar on the wire
METRIC_PREFIX = "metric."  # a client's strategy metrics in its fit reply (e.g. metric.heldout_alignment)


def tensor_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Each tensor as Flower sends it (a .npy blob: header plus raw data) plus its name."""
    return sum(_header_bytes(str(np.dtype(str(t.dtype).removeprefix("torch."))), tuple(t.shape))
               + t.numel() * t.element_size() + len(k) for k, t in state.items())


@functools.lru_cache(maxsize=4096)
def _header_bytes(dtype: str, shape: tuple[int, ...]) -> int:
    view = np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape=shape, strides=(0,) * len(shape))
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, np.lib.format.header_data_from_array_1_0(view))
    return len(buf.getvalue())  # the magic string, the header length and the padded header


def value_bytes(value) -> int:
    """One record value as Flower counts it: a bool 1, a number 8, a string its length, a list its sum."""
    if isinstance(value, (bytes, bytearray, str)):
        return len(value)
    if isinstance(value, bool):
        return 1
    if isinstance(value, Sequence):
        return sum(value_bytes(v) for v in value)
    return NUMBER_BYTES


def record_bytes(record: Mapping) -> int:
    """A metric or config record: every key plus its value (Flower's count_bytes)."""
    return sum(len(str(k)) + value_bytes(v) for k, v in record.items())


def fit_config_record(round_: int, fit_config: dict | None) -> dict:
    """The countable part of a training instruction's config (the setup string excluded)."""
    config = {"round": round_}
    if fit_config:
        config["fit_config"] = json.dumps(fit_config, sort_keys=True)
    return config


def down_bytes(state: Mapping[str, torch.Tensor], round_: int, fit_config: dict | None) -> int:
    """One training instruction: the global weights and the round's config."""
    return tensor_bytes(state) + record_bytes(fit_config_record(round_, fit_config))


def fit_metrics_record(res) -> dict:
    """The numbers of a FitResult's reply (flower_app/protocol.py: fit_reply sends these)."""
    return {"num_examples": res.num_examples, "episode_points": res.episode_points, "points": res.points,
            "losses": [float(x) for x in res.losses],
            **{f"{METRIC_PREFIX}{k}": float(v) for k, v in res.metrics.items()}}


def up_bytes(res) -> int:
    """One client's reply: its weights and its numbers."""
    return tensor_bytes(res.state) + record_bytes(fit_metrics_record(res))


def round_comm(state: Mapping[str, torch.Tensor], round_: int, fit_config: dict | None, sampled: int,
               results: list) -> dict:
    """The round's totals: every sampled client got the instruction, every result came back."""
    per_client = down_bytes(state, round_, fit_config)
    up = {r.name: up_bytes(r) for r in sorted(results, key=lambda r: r.name)}
    return {"comm_bytes_down": sampled * per_client, "comm_bytes_up": sum(up.values()),
            "comm_bytes_down_per_client": per_client, "comm_bytes_up_per_client": up}


def pooling_bytes(groups) -> int:
    """What the centralized baseline moves once instead: the training groups' local options and
    target probabilities as float32."""
    return sum(g.num_points * (int(g.x.shape[1]) + 1) * 4 for g in groups)


def human_bytes(n: float | None) -> str:
    if n is None:
        return "—"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
