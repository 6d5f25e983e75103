"""The `--secagg` settings and their validation, without flwr (orchestration's flag modules import it).

With `--secagg` each client scales its weights by its aggregation weight, quantises them and adds
masks that cancel only in the sum (Flower's SecAgg+: secagg_server.py, secagg_client.py), so the
server learns the weighted average and nothing about any one client's weights.
"""
from __future__ import annotations

from dataclasses import dataclass

from utils.errors import DataError

MODULUS_RANGE = 2 ** 32          # Flower's default and its upper limit for the mask arithmetic
DEFAULT_QUANT_RANGE = 2 ** 22    # Flower's default: 2**32 / 2**22 = 1024 clients before the sum wraps
DEFAULT_CLIP_RANGE = 8.0         # Flower's default; GPO's weights stay well inside it (checked per client)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure aggregation's settings (the --secagg* flags); `enabled` is --secagg. A share count or
    threshold is an int (a count, as Flower takes it) or a float (a fraction of the sampled clients)."""

    enabled: bool = False
    num_shares: int | float = 1.0
    threshold: int | float = 0.67
    clip_range: float = DEFAULT_CLIP_RANGE
    quant_range: int = DEFAULT_QUANT_RANGE

    def validate(self, *, engine: str, dp: bool, strategy: str, byzantine: int, save_client: bool) -> None:
        """Refuse, before any data is loaded, settings that cannot work with the run's engine, server
        rules and --save_client (plain values: this module imports no torch)."""
        if not self.enabled:
            return
        if engine != "flower":
            raise DataError(f"--secagg needs --engine flower (got --engine {engine}): in one process the server "
                            "holds every client's weights anyway",
                            "add --engine flower (simulation), or deploy with flwr run (docs/federation.md)")
        if dp:
            raise DataError("--dp clips each client's update on the server, and --secagg keeps those updates from "
                            "the server", "drop one of them (docs/federation.md: how they would compose)")
        if strategy != "fedavg":
            raise DataError(f"--strategy {strategy} with --secagg: the server sees only the weighted sum of the "
                            "clients' weights, so only FedAvg's weighted average is available",
                            "use --strategy fedavg")
        if byzantine:
            raise DataError("--byzantine simulates attackers by replacing replies at the server, which under "
                            "--secagg sees only their sum", "drop --byzantine, or drop --secagg")
        if save_client:
            raise DataError("--save_client writes each client's weights, which --secagg keeps from the server",
                            "drop --save_client, or drop --secagg")
        _check_share_flags(self.num_shares, self.threshold)
        if not self.clip_range > 0:
            raise DataError(f"--secagg_clip_range {self.clip_range:g} must be above 0",
                            f"use the default {DEFAULT_CLIP_RANGE:g} unless weights leave [-8, 8]")
        if not 2 <= self.quant_range < MODULUS_RANGE // 2:
            raise DataError(f"--secagg_quant_range {self.quant_range} must be in [2, 2**31): SecAgg+ sums "
                            "the quantised values of all clients modulo 2**32",
                            f"use the default 2**22 = {DEFAULT_QUANT_RANGE}")


def _check_share_flags(shares, threshold) -> None:
    if isinstance(shares, int) and shares != 1 and shares < 3:
        raise DataError(f"--secagg_num_shares {shares}: an integer count must be at least 3",
                    "or give a fraction of the sampled clients, e.g. 1.0 (all of them)")
    if isinstance(shares, float) and not 0 < shares <= 1:
        raise DataError(f"--secagg_num_shares {shares:g}: a fraction must be in (0, 1]", "e.g. 1.0 (every sampled client)")
    if isinstance(threshold, float) and not 0 < threshold <= 1:
        raise DataError(f"--secagg_threshold {threshold:g}: a fraction must be in (0, 1]", "e.g. 0.67")
    if isinstance(threshold, int) and threshold != 1:
        if threshold < 2:
            raise DataError(f"--secagg_threshold {threshold}: an integer must be at least 2", "e.g. 2, or a fraction")
        if isinstance(shares, int) and shares != 1 and threshold >= shares:
            raise DataError(f"--secagg_threshold {threshold} must be below --secagg_num_shares {shares}",
                        f"e.g. --secagg_threshold {shares - 1}")
