"""Typed server-side configuration, built from main_fl.py's parsed flags (orchestration/cli.py).

`server_config` and `secagg_config` are the one place the strategy, attack, DP and
secure-aggregation flags become the frozen dataclasses that federated/ and flower_app/
receive; nothing below orchestration reads the argparse Namespace for them.
"""
from __future__ import annotations

import argparse

from federated.attacks import AttackConfig
from federated.privacy import PrivacyConfig
from federated.server import ServerConfig
from federated.strategies import StrategyConfig
from flower_app.secagg import SecAggConfig


def server_config(args: argparse.Namespace) -> ServerConfig:
    """The server's rules as main_fl.py's flags give them."""
    strategy = StrategyConfig(
        name=args.strategy, proximal_mu=args.proximal_mu, qffl_q=args.qffl_q, max_weight_ratio=args.max_weight_ratio,
        adaptive_temperature=args.adaptive_temperature, adaptive_window=args.adaptive_window,
        trim_fraction=args.trim_fraction, server_opt=args.server_opt, server_lr=args.server_lr,
        server_beta1=args.server_beta1, server_beta2=args.server_beta2, server_tau=args.server_tau)
    attack = AttackConfig(byzantine=args.byzantine, attack=args.attack, scale=args.attack_scale,
                          std=args.attack_std, eps=args.attack_eps, report=args.attack_report)
    privacy = PrivacyConfig(enabled=args.dp, clip=args.dp_clip, noise=args.dp_noise, epsilon=args.dp_epsilon,
                            delta=args.dp_delta, clip_quantile=args.dp_clip_quantile, clip_lr=args.dp_clip_lr,
                            clip_count_std=args.dp_clip_count_std, secure_noise=args.dp_secure_noise)
    return ServerConfig(strategy=strategy, attack=attack, privacy=privacy, weighting=args.weighting,
                        client_fraction=args.client_fraction, seed=args.seed)


def secagg_config(args: argparse.Namespace) -> SecAggConfig:
    """Secure aggregation as main_fl.py's --secagg* flags give it."""
    return SecAggConfig(enabled=args.secagg, num_shares=args.secagg_num_shares, threshold=args.secagg_threshold,
                        clip_range=args.secagg_clip_range, quant_range=args.secagg_quant_range)
