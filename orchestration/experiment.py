"""From a run's configuration to a finished run: data → clients → trainer → run loop → summary."""
from __future__ import annotations

import dataclasses
import json

from data_loaders.datasets import ExperimentData, prepare_experiment
from federated.aggregation import num_sampled_clients
from federated.fedavg import FedAvgTrainer, check_min_clients, resolve_client_engine
from federated.server import build_server
from orchestration.centralized import CentralizedTrainer
from orchestration.cli import build_parser
from orchestration.config import RunConfig, check_question_counts, check_run, check_server, run_config
from orchestration.loop import RunLoop
from orchestration.resume import mark_failed, plan_run
from training.local import DIVERGENCE_HINT, DivergenceError
from utils.device import resolve_device
from utils.distances import DEFAULT_METRIC, metric_named
from utils.errors import DataError
from utils.provenance import environment_info
from utils.run_folder import FAILED
from utils.seeding import seed_everything
from utils.wandb_logger import WandbLogger


def check_flags(args, method: str | None = None) -> RunConfig:
    """The run's configuration, refused before anything is loaded or written when a setting is wrong
    whatever the data. With `method`, also what --resume --out_dir can refuse from the flags alone."""
    run = run_config(args, method or ("fedavg" if hasattr(args, "strategy") else "centralized"))
    check_run(run, resume=method is not None)
    return run


def load_data(run: RunConfig, log=print) -> ExperimentData:
    """The run's groups as tensors; a group too small for the run fails before any embedding."""
    return prepare_experiment(run.data, log=log, check=lambda counts, tr, ev: check_question_counts(run, counts, tr, ev))


def run_and_data(argv: list[str] | None, method: str = "fedavg") -> tuple[RunConfig, ExperimentData]:
    """The checked run of these flags and its data, loaded without a word (the analysis scripts')."""
    run = check_flags(build_parser(method).parse_args(argv))
    return run, load_data(run, log=lambda *_: None)


def validate(run: RunConfig, data: ExperimentData) -> None:
    """Fail before training on anything that would fail (or mean nothing) later."""
    metric = run.client.metric
    if metric_named(metric).needs_ordinals and not data.has_ordinals:
        raise DataError(f"--metric {metric} needs ordinal options; {run.data.dataset} has none",
                        f"use --metric {DEFAULT_METRIC}")
    counts = {n: g.num_questions for n, g in {**data.train, **data.eval}.items()}
    check_question_counts(run, counts, sorted(data.train), sorted(data.eval))
    if run.method == "fedavg":
        check_server(run, len(data.train), log=print)


def make_trainer(run: RunConfig, data: ExperimentData, device):
    fed, server, mcfg = run.federation, run.server, run.model_for(data.dim_x, data.question_ids)
    if run.method == "centralized":
        return CentralizedTrainer(data, run.client, mcfg, central_mode=fed.central_mode,
                                  train_batch_size=fed.train_batch_size, central_steps=fed.central_steps, device=device)
    rules = build_server(server, sorted(data.train), run.loop.rounds)
    if fed.engine == "flower":
        flower = dict(weighting=server.weighting, client_fraction=server.client_fraction,
                      min_clients=fed.min_clients, round_timeout=fed.round_timeout)
        if run.secagg.enabled:
            from flower_app.secagg_server import SecAggTrainer
            return SecAggTrainer(run.secagg, data, run.client, mcfg, **flower)
        from flower_app.federation import FlowerTrainer  # data: FederatedData from the ServerApp
        return FlowerTrainer(data, run.client, mcfg, server=rules, **flower)
    # In one process every sampled client replies, so only the sample size can fall short.
    check_min_clients(fed.min_clients, num_sampled_clients(len(data.train), server.client_fraction))
    return FedAvgTrainer(data, run.client, mcfg, weighting=server.weighting, client_fraction=server.client_fraction,
                         device=device, client_engine=fed.client_engine,
                         client_workers=fed.client_workers, server=rules)


def resolved_config(run: RunConfig, data: ExperimentData, device) -> dict:
    """config.json: the flags, then what the run resolved from them and the data."""
    mcfg = run.model_for(data.dim_x, data.question_ids)
    cfg = dict(run.flags)
    cfg.update(method=run.method, metric=run.client.metric, device_resolved=str(device), dim_x=data.dim_x,
               train_groups=sorted(data.train), eval_groups=sorted(data.eval),
               data=data.info, environment=environment_info(), model_config=mcfg.to_dict())
    if run.method == "fedavg" and run.federation.engine == "inprocess":
        cfg["client_engine_resolved"] = resolve_client_engine(run.federation.client_engine, device, mcfg)
    return cfg


def run_method(run: RunConfig, data: ExperimentData, out_dir=None, log=print, stop_after: int | None = None) -> dict:
    """Train one method on already-prepared data and write its run folder; returns the summary.

    stop_after: end the loop after that many rounds, everything else (the schedule, a DP noise
    solved for all --comm_round rounds) as in the full run: the replay of a recorded run."""
    device = resolve_device(run.federation.device)
    validate(run, data)
    seed_everything(run.client.seed)
    config = resolved_config(run, data, device)
    plan = plan_run(run, config, out_dir, log)
    try:
        return _run_planned(plan, run, data, config, device, log, stop_after)
    finally:
        plan.lock.release()


def _run_planned(plan, run: RunConfig, data, config, device, log, stop_after=None) -> dict:
    run_dir, method = plan.run_dir, run.method
    if plan.finished:
        log(f"{method}: nothing to do; summary in {run_dir.summary_path}")
        return json.loads(run_dir.summary_path.read_text())
    engine = f", client engine {config['client_engine_resolved']}" if "client_engine_resolved" in config else ""
    log(f"{method}: run folder {run_dir.path} on {device}{engine}")
    trainer = make_trainer(run, data, device)
    wandb = WandbLogger(run.output.wandb, project=run.output.wandb_project, run_name=run_dir.path.name,
                        config=config, dir=run_dir.path, group=f"{run.data.dataset}-s{run.client.seed}")
    loop_cfg = run.loop
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
                        divergence_hint(run)) from None
    finally:
        wandb.finish()
    log(f"{method}: summary in {run_dir.path / 'summary.json'}")
    return summary


def divergence_hint(run: RunConfig) -> str:
    """Under DP the usual cause is the noise, not the learning rate: name it."""
    dp = run.server.privacy
    if not dp.enabled:
        return DIVERGENCE_HINT
    z = f"--dp_noise {dp.noise:g}" if dp.noise is not None else f"the noise --dp_epsilon {dp.epsilon:g} needs"
    return (f"{z} adds Gaussian noise of std z x --dp_clip / (clients per round) to every weight each round; "
            "noise that large swamps the model: lower --dp_noise (or raise --dp_epsilon), sample more clients per "
            f"round, or {DIVERGENCE_HINT}")
