"""From parsed flags to a finished run: data → clients → trainer → run loop → summary."""
from __future__ import annotations

import dataclasses
import json
import math

from data_loaders.datasets import ExperimentData, choose_groups, split_seed
from data_loaders.episodes import EpisodeSizes
from data_loaders.schema import DataError
from federated.aggregation import num_sampled_clients
from federated.fedavg import FedAvgTrainer, check_min_clients, resolve_client_engine
from federated.server import build_server
from federated.strategies import Strategy
from orchestration.centralized import CentralizedTrainer
from orchestration.config import secagg_config, server_config
from orchestration.extras import check_extras
from orchestration.loop import LoopConfig, RunLoop
from orchestration.resume import check_resume_early, mark_failed, plan_run
from training.config import ClientConfig, client_config, episode_sizes, model_config, resolve_metric
from training.local import DIVERGENCE_HINT, DivergenceError
from utils.device import resolve_device
from utils.distances import DEFAULT_METRIC, metric_named
from utils.provenance import environment_info
from utils.run_folder import FAILED
from utils.seeding import seed_everything
from utils.wandb_logger import WandbLogger, has_wandb_credentials

# (flag, is the value fine, what it must be); flags missing from a parser are skipped.
_FLAG_RULES = (
    ("data_split", lambda v: 0 < v < 1, "in (0, 1); the paper uses 0.9"),
    ("question_split", lambda v: 0 <= v < 1, "in [0, 1); 0 is the paper's split, paper_unseen uses 0.2"),
    ("eval_num_qs", lambda v: v >= 1, ">= 1; the paper uses 20"),
    ("comm_round", lambda v: v >= 1, ">= 1; the paper uses 1300"),
    ("central_epochs", lambda v: v >= 1, ">= 1; the paper uses 1300"),
    ("epochs", lambda v: v >= 1, ">= 1 local steps; the paper uses 6"),
    ("federated_eval", lambda v: v >= 1, ">= 1 rounds between evaluations"),
    ("eval_freq", lambda v: v >= 1, ">= 1 epochs between evaluations"),
    ("lr", lambda v: v > 0, "> 0; the paper uses 3e-4"),
    ("num_steps", lambda v: v >= 1, ">= 1 (T_max of the cosine schedule); the paper uses 100"),
    ("client_fraction", lambda v: 0 < v <= 1, "in (0, 1]"),
    ("train_batch_size", lambda v: v >= 1, ">= 1 groups per step"),
    ("eval_batch_size", lambda v: v >= 0, ">= 0 (0 = all targets at once)"),
    ("client_workers", lambda v: v >= 0, ">= 0 (0 = torch's intra-op thread count)"),
    ("context_factors", lambda v: v >= 0, ">= 0 (0 = off, the paper)"),
    ("factor_ridge", lambda v: v > 0, "> 0 (a context shorter than --context_factors makes the fit singular)"),
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("d_model", lambda v: v >= 1, ">= 1"),
    ("num_layers", lambda v: v >= 1, ">= 1"),
    ("emb_depth", lambda v: v >= 1, ">= 1 linear layers"),
    ("central_steps", lambda v: v >= 1, ">= 1 steps per group per epoch (--epochs matches a FedAvg round)"),
    ("grad_clip", lambda v: v >= 0, ">= 0 (0 = off)"),
    ("keep_checkpoints", lambda v: v >= 1, ">= 1: the newest checkpoint is what --resume continues from"),
    ("log_every", lambda v: v >= 0, ">= 0 rounds (0 = only at evaluations)"),
    ("round_timeout", lambda v: v >= 0, ">= 0 seconds (0 = wait for every node)"),
    ("node_wait", lambda v: v > 0, "> 0 seconds"),
    ("sim_client_cpus", lambda v: v > 0, "> 0 cores"),
    ("sim_client_gpus", lambda v: v >= 0, ">= 0"),
)


def check_finite_flags(args) -> None:
    """inf/nan parse as floats but break every range check and strict JSON (config.json)."""
    for flag, value in sorted(vars(args).items()):
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"--{flag} {value} is not a finite number", f"give --{flag} a finite value")


def check_flags(args, method: str | None = None) -> None:
    """Flag values that are wrong whatever the data; checked before anything is loaded or written."""
    check_finite_flags(args)
    check_extras(args)
    if method is not None:
        check_resume_early(method, args)
    if hasattr(args, "strategy"):  # FedAvg's server rules, with the client count when the flags decide it
        train = train_groups_from_flags(args)
        check_server_flags(args, num_train=None if train is None else len(train))
        server = server_config(args)
        secagg_config(args).validate(engine=args.engine, dp=server.privacy.enabled, strategy=server.strategy.name,
                                     byzantine=server.attack.byzantine, save_client=args.save_client)
    for flag, ok, need in _FLAG_RULES:
        value = getattr(args, flag, None)
        if value is not None and not ok(value):
            raise DataError(f"--{flag} {value} must be {need}", f"fix --{flag}")
    if getattr(args, "question_split", 0.0) and getattr(args, "engine", "inprocess") == "flower":
        raise DataError("--question_split does not work with --engine flower: the nodes split their own data "
                        "and the server never sees which questions they hold",
                        "run the leakage-free protocol with --engine inprocess (the default)")
    if args.d_model % args.nhead:
        raise DataError(f"--d_model {args.d_model} is not divisible by --nhead {args.nhead}",
                        "attention splits d_model evenly across heads; the paper uses 128 and 4")
    if args.wandb == "online" and not has_wandb_credentials():
        raise DataError("--wandb online: no W&B credentials found (WANDB_API_KEY or netrc)",
                        "run `wandb login`, or use --wandb offline (sync later) or --wandb off")
    EpisodeSizes(args.min_ctx_num_qs, args.max_ctx_num_qs, args.min_tar_num_qs, args.max_tar_num_qs).validate()
    episode_sizes(args).validate()  # --episode_bounds code can scale a bound of 1 down to 0
    resolve_device(args.device)  # an unknown or absent device fails here, not after minutes of embedding
    if getattr(args, "emb_device", "auto") != "auto":
        resolve_device(args.emb_device, "--emb_device")


def train_groups_from_flags(args) -> list[str] | None:
    """The training groups when the flags alone decide them: every dataset but synthetic, whose
    group names come from its generator (it loads in a second anyway)."""
    if getattr(args, "dataset", "synthetic") == "synthetic" or not hasattr(args, "train_groups"):
        return None
    return choose_groups(args.dataset, args.train_groups, args.eval_groups, args.group_split, split_seed(args))[0]


def check_question_counts(args, counts: dict[str, int], train: list[str], evals: list[str]) -> None:
    """Every training group must fit an episode in its local split; every eval group must keep targets."""
    sizes = episode_sizes(args)
    need = sizes.min_ctx + sizes.min_tar
    for name in (*train, *evals):
        if counts[name] == 0:
            raise DataError(f"group {name!r} has no questions left after the data filter",
                            "see the drop counts in the load log; leave the group out with "
                            "--train_groups / --eval_groups")
    for name in train:
        local = int(counts[name] * args.data_split)
        if local < need:
            raise DataError(
                f"training group {name!r} has {local} local questions ({args.data_split:g} of {counts[name]}), "
                f"fewer than --min_ctx_num_qs + --min_tar_num_qs = {need}",
                "lower --min_ctx_num_qs / --min_tar_num_qs, or leave the group out with --train_groups")
    for name in evals:
        if counts[name] <= args.eval_num_qs:
            raise DataError(f"evaluation group {name!r} has {counts[name]} questions; --eval_num_qs "
                            f"{args.eval_num_qs} leaves none to score",
                            "lower --eval_num_qs, or leave the group out with --eval_groups")


def check_server_flags(args, num_train: int | None, log=None) -> None:
    """Strategy, attack and DP flags; with `num_train` unknown (before loading) only the checks
    that need no client count run, so a bad flag fails before minutes of embedding."""
    n = num_train if num_train is not None else 1 << 30
    server = server_config(args)
    warnings = server.validate(n)
    if num_train is None:
        return
    # refuses a run whose rounds would spend more than --dp_epsilon
    server.build_dp(Strategy(server.strategy), num_train, args.comm_round)
    for w in warnings if log is not None else ():
        log(f"warning: {w}")


def validate(args, data: ExperimentData, metric: str) -> None:
    """Fail before training on anything that would fail (or mean nothing) later."""
    if metric_named(metric).needs_ordinals and not data.has_ordinals:
        raise DataError(f"--metric {metric} needs ordinal options; {args.dataset} has none",
                        f"use --metric {DEFAULT_METRIC}")
    counts = {n: g.num_questions for n, g in {**data.train, **data.eval}.items()}
    check_question_counts(args, counts, sorted(data.train), sorted(data.eval))
    if hasattr(args, "strategy"):
        check_server_flags(args, len(data.train), log=print)


def make_trainer(method: str, args, data: ExperimentData, cfg: ClientConfig, device):
    mcfg = model_config(args, data.dim_x)
    server = build_server(server_config(args), sorted(data.train), args.comm_round) if method == "fedavg" else None
    if method == "fedavg" and getattr(args, "engine", "inprocess") == "flower":
        flower = dict(weighting=args.weighting, client_fraction=args.client_fraction, min_clients=args.min_clients,
                      round_timeout=args.round_timeout)
        secagg = secagg_config(args)
        if secagg.enabled:
            from flower_app.secagg_server import SecAggTrainer
            return SecAggTrainer(secagg, data, cfg, mcfg, **flower)
        from flower_app.federation import FlowerTrainer  # data: FederatedData from the ServerApp
        return FlowerTrainer(data, cfg, mcfg, server=server, **flower)
    if method == "fedavg":
        check_sample_size(args, len(data.train))
        return FedAvgTrainer(data, cfg, mcfg, weighting=args.weighting, client_fraction=args.client_fraction,
                             device=device, client_engine=args.client_engine, client_workers=args.client_workers,
                             server=server)
    return CentralizedTrainer(data, cfg, mcfg, central_mode=args.central_mode,
                              train_batch_size=args.train_batch_size,
                              central_steps=getattr(args, "central_steps", 1), device=device)


def check_sample_size(args, num_train: int) -> None:
    """In one process every sampled client replies, so only the sample size can fall short."""
    check_min_clients(getattr(args, "min_clients", 1), num_sampled_clients(num_train, args.client_fraction))


def resolved_config(args, method: str, data: ExperimentData, metric: str, device) -> dict:
    mcfg = model_config(args, data.dim_x)
    cfg = {k: v for k, v in vars(args).items()}
    cfg.update(method=method, metric=metric, device_resolved=str(device), dim_x=data.dim_x,
               train_groups=sorted(data.train), eval_groups=sorted(data.eval),
               data=data.info, environment=environment_info(), model_config=mcfg.to_dict())
    if method == "fedavg" and getattr(args, "engine", "inprocess") == "inprocess":
        cfg["client_engine_resolved"] = resolve_client_engine(args.client_engine, device, mcfg)
    return cfg


def run_method(method: str, args, data: ExperimentData, out_dir=None, log=print, stop_after: int | None = None
               ) -> dict:
    """Train one method on already-prepared data and write its run folder; returns the summary.

    stop_after: end the loop after that many rounds, everything else (the schedule, a DP noise
    solved for all --comm_round rounds) as in the full run: the replay of a recorded run."""
    metric = resolve_metric(args)
    device = resolve_device(args.device)
    cfg = client_config(args, metric)
    validate(args, data, metric)
    seed_everything(args.seed)
    config = resolved_config(args, method, data, metric, device)
    plan = plan_run(method, args, config, out_dir, log)
    try:
        return _run_planned(plan, method, args, data, cfg, config, device, log, stop_after)
    finally:
        plan.release()


def _run_planned(plan, method, args, data, cfg, config, device, log, stop_after=None) -> dict:
    run_dir = plan.run_dir
    if plan.finished:
        log(f"{method}: nothing to do; summary in {run_dir.summary_path}")
        return json.loads(run_dir.summary_path.read_text())
    engine = f", client engine {config['client_engine_resolved']}" if "client_engine_resolved" in config else ""
    log(f"{method}: run folder {run_dir.path} on {device}{engine}")
    trainer = make_trainer(method, args, data, cfg, device)
    wandb = WandbLogger(args.wandb, project=args.wndb_project_name, run_name=run_dir.path.name,
                        config=config, dir=run_dir.path, group=f"{args.dataset}-s{args.seed}")
    loop_cfg = loop_config(method, args)
    if stop_after is not None:
        loop_cfg = dataclasses.replace(loop_cfg, rounds=min(stop_after, loop_cfg.rounds))
    loop = RunLoop(trainer, loop_cfg, run_dir, wandb, log=log)
    try:
        if plan.resume:
            loop.resume()
        summary = loop.run()
    except DivergenceError as err:
        headline = str(err).splitlines()[0]
        mark_failed(run_dir.path, headline, round=err.round, client=err.client)
        raise DataError(f"{headline}\n  the run folder {run_dir.path} is marked failed ({FAILED}); start a new run",
                        divergence_hint(args)) from None
    finally:
        wandb.finish()
    log(f"{method}: summary in {run_dir.path / 'summary.json'}")
    return summary


def divergence_hint(args) -> str:
    """Under DP the usual cause is the noise, not the learning rate: name it."""
    if not getattr(args, "dp", False):
        return DIVERGENCE_HINT
    z = f"--dp_noise {args.dp_noise:g}" if args.dp_noise is not None else f"the noise --dp_epsilon {args.dp_epsilon:g} needs"
    return (f"{z} adds Gaussian noise of std z x --dp_clip / (clients per round) to every weight each round; "
            "noise that large swamps the model: lower --dp_noise (or raise --dp_epsilon), sample more clients per "
            f"round, or {DIVERGENCE_HINT}")


def loop_config(method: str, args) -> LoopConfig:
    rounds = args.comm_round if method == "fedavg" else args.central_epochs
    every = args.federated_eval if method == "fedavg" else args.eval_freq
    return LoopConfig(rounds=rounds, eval_every=max(1, every), save_client=getattr(args, "save_client", False),
                      keep_checkpoints=getattr(args, "keep_checkpoints", 3), keep_best=getattr(args, "keep_best", False),
                      log_every=getattr(args, "log_every", 10), plots=not getattr(args, "no_plots", False))
