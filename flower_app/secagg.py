"""Flags of secure aggregation (`--secagg`): Flower's SecAgg+ on the Flower engine.

orchestration/cli.py imports this module to build main_fl.py's parser, so it needs no flwr; the
protocol itself lives in secagg_server.py (ServerApp side) and secagg_client.py (ClientApp
side), which import flwr.

With `--secagg` each training client scales its local weights by its aggregation weight,
quantises them and adds masks that cancel only in the sum (Flower's SecAgg+ protocol:
flwr.server.workflow.SecAggPlusWorkflow with flwr.client.mod.secaggplus_mod); the server
learns the weighted average and nothing about any single client's weights.
"""
from __future__ import annotations

import argparse

from utils.errors import DataError

MODULUS_RANGE = 2 ** 32          # Flower's default and its upper limit for the mask arithmetic
DEFAULT_QUANT_RANGE = 2 ** 22    # Flower's default: 2**32 / 2**22 = 1024 clients before the sum wraps
DEFAULT_CLIP_RANGE = 8.0         # Flower's default; GPO's weights stay well inside it (checked per client)


def share_count(text: str) -> int | float:
    """An integer count (as Flower takes it), or a fraction of the sampled clients when it has a dot."""
    try:
        return float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an integer nor a fraction such as 0.5") from None


def add_secagg_arguments(group) -> None:
    """Add the secure-aggregation flags to an argparse group (main_fl.py's federation engine group)."""
    group.add_argument("--secagg", action="store_true",
                       help="flower: secure aggregation with Flower's SecAgg+: the server sees only the sum of "
                            "masked, quantised client weights, never one client's (docs/federation.md)")
    group.add_argument("--secagg_num_shares", type=share_count, default=1.0,
                       help="secagg: how many clients hold a share of each client's secrets: an integer >= 3, or "
                            "a fraction of the sampled clients (1.0: every sampled client)")
    group.add_argument("--secagg_threshold", type=share_count, default=0.67,
                       help="secagg: shares needed to rebuild a secret (the most clients that may drop out is "
                            "shares - threshold; fewer than threshold colluding clients learn nothing): an "
                            "integer >= 2 below --secagg_num_shares, or a fraction of it (at least 2 either way)")
    group.add_argument("--secagg_clip_range", type=float, default=DEFAULT_CLIP_RANGE,
                       help="secagg: every weight, times its client's aggregation weight / the largest one, must "
                            "lie in [-R, R] (a client outside it stops the run); the quantisation step is "
                            "2R / --secagg_quant_range")
    group.add_argument("--secagg_quant_range", type=int, default=DEFAULT_QUANT_RANGE,
                       help="secagg: integer levels a weight is quantised to; clients x levels must stay below "
                            "2**32 (default 2**22: 1023 clients)")


def check_secagg_flags(args) -> None:
    """Refuse, before any data is loaded, secure-aggregation flags that cannot work."""
    if not getattr(args, "secagg", False):
        return
    engine = getattr(args, "engine", "inprocess")
    if engine != "flower":
        raise DataError(f"--secagg needs --engine flower (got --engine {engine}): in one process the server "
                        "holds every client's weights anyway",
                        "add --engine flower (simulation), or deploy with flwr run (docs/federation.md)")
    if getattr(args, "dp", False):
        raise DataError("--dp clips each client's update on the server, and --secagg keeps those updates from "
                        "the server", "drop one of them (docs/federation.md: how they would compose)")
    strategy = getattr(args, "strategy", "fedavg")
    if strategy != "fedavg":
        raise DataError(f"--strategy {strategy} with --secagg: the server sees only the weighted sum of the "
                        "clients' weights, so only FedAvg's weighted average is available", "use --strategy fedavg")
    if getattr(args, "byzantine", 0):
        raise DataError("--byzantine simulates attackers by replacing replies at the server, which under --secagg "
                        "sees only their sum", "drop --byzantine, or drop --secagg")
    if getattr(args, "save_client", False):
        raise DataError("--save_client writes each client's weights, which --secagg keeps from the server",
                        "drop --save_client, or drop --secagg")
    _check_share_flags(args.secagg_num_shares, args.secagg_threshold, DataError)
    if not args.secagg_clip_range > 0:
        raise DataError(f"--secagg_clip_range {args.secagg_clip_range:g} must be above 0",
                        f"use the default {DEFAULT_CLIP_RANGE:g} unless weights leave [-8, 8]")
    if not 2 <= args.secagg_quant_range < MODULUS_RANGE // 2:
        raise DataError(f"--secagg_quant_range {args.secagg_quant_range} must be in [2, 2**31): SecAgg+ sums "
                        "the quantised values of all clients modulo 2**32",
                        f"use the default 2**22 = {DEFAULT_QUANT_RANGE}")


def _check_share_flags(shares, threshold, error) -> None:
    if isinstance(shares, int) and shares != 1 and shares < 3:
        raise error(f"--secagg_num_shares {shares}: an integer count must be at least 3",
                    "or give a fraction of the sampled clients, e.g. 1.0 (all of them)")
    if isinstance(shares, float) and not 0 < shares <= 1:
        raise error(f"--secagg_num_shares {shares:g}: a fraction must be in (0, 1]", "e.g. 1.0 (every sampled client)")
    if isinstance(threshold, float) and not 0 < threshold <= 1:
        raise error(f"--secagg_threshold {threshold:g}: a fraction must be in (0, 1]", "e.g. 0.67")
    if isinstance(threshold, int) and threshold != 1:
        if threshold < 2:
            raise error(f"--secagg_threshold {threshold}: an integer must be at least 2", "e.g. 2, or a fraction")
        if isinstance(shares, int) and shares != 1 and threshold >= shares:
            raise error(f"--secagg_threshold {threshold} must be below --secagg_num_shares {shares}",
                        f"e.g. --secagg_threshold {shares - 1}")
