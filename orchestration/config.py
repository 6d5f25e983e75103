"""The run's typed configuration: one frozen RunConfig, built once from the parsed flags (cli.py) or
from a run's config.json, and validated here. Nothing below orchestration reads the flags."""
from __future__ import annotations

import argparse
import importlib
import math
from dataclasses import dataclass, fields, replace

from data_loaders.datasets import DataConfig, EmbeddingConfig, chosen_groups
from data_loaders.episodes import EpisodeSizes
from data_loaders.synthetic import SyntheticSpec
from federated.attacks import AttackConfig
from federated.privacy import PrivacyConfig
from federated.server import ServerConfig
from federated.strategies import Strategy, StrategyConfig
from flower_app.secagg import SecAggConfig
from models.gpo import GPOConfig
from orchestration.cli import flag_defaults
from orchestration.loop import LoopConfig
from orchestration.resume import check_resume_early
from training.config import ClientConfig
from training.local import OptimConfig
from utils.device import resolve_device
from utils.distances import auto_metric
from utils.errors import DataError
from utils.wandb_logger import has_wandb_credentials

# (flag, is the value fine, what it must be); flags the method's parser lacks are skipped.
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
    ("dropout", lambda v: 0 <= v < 1, "in [0, 1)"),
    ("context_factors", lambda v: v >= 0, ">= 0 (0 = off, the paper)"),
    ("factor_ridge", lambda v: v > 0, "> 0 (a context shorter than --context_factors makes the fit singular)"),
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


@dataclass(frozen=True)
class FederationConfig:
    """Where and how the clients' computation runs (FedAvg), or the pooled steps are batched (centralized)."""

    device: str = "auto"
    engine: str = "inprocess"
    client_engine: str = "auto"
    client_workers: int = 0
    min_clients: int = 1
    round_timeout: float = 0.0
    node_wait: float = 120.0
    sim_backend: str = "thread"
    sim_client_cpus: float = 1.0
    sim_client_gpus: float = 0.0
    central_mode: str = "sequential"
    train_batch_size: int = 32
    central_steps: int = 1


@dataclass(frozen=True)
class OutputConfig:
    out_dir: str | None = None
    resume: bool = False
    wandb: str = "auto"
    wandb_project: str = "plurallm"
    also_centralized: bool = False


@dataclass(frozen=True)
class RunConfig:
    method: str                 # fedavg | centralized
    flags: dict                 # the parsed flags, exactly as config.json records them
    data: DataConfig
    model: GPOConfig
    client: ClientConfig
    loop: LoopConfig
    federation: FederationConfig
    output: OutputConfig
    server: ServerConfig
    secagg: SecAggConfig

    def model_for(self, dim_x: int, question_ids: int = 0) -> GPOConfig:
        return replace(self.model, dim_x=dim_x, question_ids=question_ids)


def _from_flags(cls, f, prefix: str = "", **given):
    """A config whose field x is the flag --<prefix>x, else --x (a field without a flag keeps its default)."""
    names = [(x.name, prefix + x.name) for x in fields(cls) if x.name not in given]
    return cls(**given, **{n: getattr(f, p if hasattr(f, p) else n) for n, p in names if hasattr(f, p) or hasattr(f, n)})


def run_config(args: argparse.Namespace, method: str = "fedavg") -> RunConfig:
    """The typed configuration of a run of `method` with these flags (validated by `check_run`)."""
    f = argparse.Namespace(**{**flag_defaults(), **vars(args)})
    fedavg = method == "fedavg"
    return RunConfig(
        method=method, flags=dict(vars(args)), data=data_config(f), model=_from_flags(GPOConfig, f, dim_x=0),
        client=_from_flags(ClientConfig, f, sizes=episode_sizes(f), optim=_from_flags(OptimConfig, f),
                           metric=resolve_metric(f)), federation=_from_flags(FederationConfig, f),
        loop=_from_flags(LoopConfig, f, rounds=f.comm_round if fedavg else f.central_epochs, plots=not f.no_plots,
                         eval_every=max(1, f.federated_eval if fedavg else f.eval_freq)),
        output=_from_flags(OutputConfig, f, wandb_project=f.wndb_project_name),
        server=_from_flags(ServerConfig, f, strategy=_from_flags(StrategyConfig, f, name=f.strategy),
                           attack=_from_flags(AttackConfig, f, "attack_"),
                           privacy=_from_flags(PrivacyConfig, f, "dp_", enabled=f.dp)),
        secagg=_from_flags(SecAggConfig, f, "secagg_", enabled=f.secagg))


def data_config(f) -> DataConfig:
    emb = _from_flags(EmbeddingConfig, f, "emb_", pickle_path=f.emb_pickle)
    syn = _from_flags(SyntheticSpec, f, "syn_", num_groups=f.syn_groups, num_questions=f.syn_questions)
    groups = {k: None if getattr(f, k) is None else tuple(getattr(f, k)) for k in ("train_groups", "eval_groups")}
    return _from_flags(DataConfig, f, **groups, split_seed=f.seed if f.split_seed is None else f.split_seed,
                       embedding=emb, synthetic=syn, min_episode_qs=f.min_ctx_num_qs + f.min_tar_num_qs)


def episode_sizes(f) -> EpisodeSizes:
    """The four bounds as given (paper), or scaled by --data_split as the released code does
    for local data (int(100·0.9) = 90, int(10·0.9) = 9), clients and centralized alike."""
    bounds = (f.min_ctx_num_qs, f.max_ctx_num_qs, f.min_tar_num_qs, f.max_tar_num_qs)
    if f.episode_bounds == "code":
        bounds = tuple(int(b * f.data_split) for b in bounds)
    return EpisodeSizes(*bounds, virtual_tilt=f.virtual_tilt)


def resolve_metric(f) -> str:
    return f.metric if f.metric != "auto" else auto_metric(f.dataset)


def run_from_json(config: dict, data_path: str | None = None, cache_dir: str | None = None) -> RunConfig:
    """The configuration a run was trained with, from its config.json (unknown keys ignored)."""
    known = flag_defaults()
    args = argparse.Namespace(**{**known, **{k: v for k, v in config.items() if k in known}})
    args.group_split = None  # train_groups / eval_groups in a config are already resolved lists
    args.data_path, args.cache_dir = data_path or args.data_path, cache_dir or args.cache_dir
    emb = (config.get("data") or {}).get("embedding") or {}
    name = emb.get("model_id") if emb.get("emb_model") == "hf" else emb.get("emb_model")  # "hf": the id is the flag
    if name and name not in ("auto", "synthetic"):
        args.emb_model = name
    args.quiet, args.resume = True, False
    return run_config(args, config.get("method", "fedavg"))


# ---------------------------------------------------------------------------------------- validation


def check_run(run: RunConfig, resume: bool = False) -> None:
    """Settings that are wrong whatever the data; checked before anything is loaded or written.
    `resume`: also what --resume --out_dir can refuse from the flags alone."""
    for flag, value in sorted(run.flags.items()):  # inf/nan break every range check and strict JSON
        if isinstance(value, float) and not math.isfinite(value):
            raise DataError(f"--{flag} {value} is not a finite number", f"give --{flag} a finite value")
    check_extras(run)
    if resume:
        check_resume_early(run)
    if run.method == "fedavg":  # FedAvg's server rules, with the client count when the flags decide it
        train = None if run.data.dataset == "synthetic" else chosen_groups(run.data)[0]
        check_server(run, num_train=None if train is None else len(train))
        s = run.server
        run.secagg.validate(engine=run.federation.engine, dp=s.privacy.enabled, strategy=s.strategy.name,
                            byzantine=s.attack.byzantine, save_client=run.loop.save_client)
    for flag, ok, need in _FLAG_RULES:
        value = run.flags.get(flag)
        if value is not None and not ok(value):
            raise DataError(f"--{flag} {value} must be {need}", f"fix --{flag}")
    if run.federation.engine == "flower":
        check_federation(run)
    if run.model.d_model % run.model.nhead:
        raise DataError(f"--d_model {run.model.d_model} is not divisible by --nhead {run.model.nhead}",
                        "attention splits d_model evenly across heads; the paper uses 128 and 4")
    if run.output.wandb == "online" and not has_wandb_credentials():
        raise DataError("--wandb online: no W&B credentials found (WANDB_API_KEY or netrc)",
                        "run `wandb login`, or use --wandb offline (sync later) or --wandb off")
    f = run.flags
    EpisodeSizes(f["min_ctx_num_qs"], f["max_ctx_num_qs"], f["min_tar_num_qs"], f["max_tar_num_qs"]).validate()
    run.client.sizes.validate()  # --episode_bounds code can scale a bound of 1 down to 0
    resolve_device(run.federation.device)  # an unknown or absent device fails here, not after minutes of embedding
    if run.data.embedding.device != "auto":
        resolve_device(run.data.embedding.device, "--emb_device")


def check_federation(run: RunConfig) -> None:
    """Settings that mean something in one process but not in a federation (--engine flower)."""
    fed = run.federation
    refused = (
        (run.data.question_split, "--question_split does not work with --engine flower: the nodes split their own "
         "data and the server never sees which questions they hold",
         "run the leakage-free protocol with --engine inprocess (the default)"),
        (run.output.resume, "--resume is not supported with --engine flower: the clients' Adam states live on "
         "their nodes, so a restarted federation would not continue the same run",
         "rerun from round 0, or use --engine inprocess for resumable runs"),
        (run.data.question_ids, "--question_ids does not work with --engine flower yet: the server builds the "
         "model before the nodes report their data, so it cannot start the question columns' weights at 0",
         "run --question_ids with --engine inprocess (the default)"),
        (run.output.also_centralized, "--also_centralized pools every group's data in one process, which a "
         "federation does not have", "run main_centralized.py with the same flags instead"),
        (fed.client_engine not in ("auto", "loop"), f"--client_engine {fed.client_engine} runs clients inside one "
         "process; with --engine flower every client runs on its own node", "drop --client_engine"))
    for bad, error, hint in refused:
        if bad:
            raise DataError(error, hint)


def check_extras(run: RunConfig) -> None:
    """The optional packages (pyproject.toml extras) the flags need: one found missing mid-run would
    leave a run folder behind that the rerun refuses as "already holds a run"."""
    flower = run.federation.engine == "flower"
    needs = (("--engine flower", flower, "flwr", "flower"),
             ("--sim_backend ray", flower and run.federation.sim_backend == "ray", "ray", "flower"),
             ("--dp", run.server.privacy.enabled, "opacus", "dp"))
    for flag, module, extra in ((f, m, e) for f, wanted, m, e in needs if wanted):
        try:
            importlib.import_module(module)  # a real import: a broken install counts as missing
        except ImportError as why:
            raise DataError(f"{flag} needs the optional package {module!r}, which cannot be imported ({why})",
                            f"pip install 'plurallm[{extra}]' (from a clone: pip install -e '.[{extra}]'), "
                            f"or drop {flag}") from why


def check_server(run: RunConfig, num_train: int | None, log=None) -> None:
    """Strategy, attack and DP settings; with `num_train` unknown (before loading) only the checks
    that need no client count run, so a bad flag fails before minutes of embedding."""
    server = run.server
    warnings = server.validate(num_train if num_train is not None else 1 << 30)
    if num_train is None:
        return
    # refuses a run whose rounds would spend more than --dp_epsilon
    server.build_dp(Strategy(server.strategy), num_train, run.loop.rounds)
    for w in warnings if log is not None else ():
        log(f"warning: {w}")


def check_question_counts(run: RunConfig, counts: dict[str, int], train: list[str], evals: list[str]) -> None:
    """Every training group must fit an episode in its local split; every eval group must keep targets."""
    sizes, split, eval_num_qs = run.client.sizes, run.client.data_split, run.client.eval_num_qs
    need = sizes.min_ctx + sizes.min_tar
    for name in (*train, *evals):
        if counts[name] == 0:
            raise DataError(f"group {name!r} has no questions left after the data filter",
                            "see the drop counts in the load log; leave the group out with "
                            "--train_groups / --eval_groups")
    for name in train:
        local = int(counts[name] * split)
        if local < need:
            raise DataError(
                f"training group {name!r} has {local} local questions ({split:g} of {counts[name]}), "
                f"fewer than --min_ctx_num_qs + --min_tar_num_qs = {need}",
                "lower --min_ctx_num_qs / --min_tar_num_qs, or leave the group out with --train_groups")
    for name in evals:
        if counts[name] <= eval_num_qs:
            raise DataError(f"evaluation group {name!r} has {counts[name]} questions; --eval_num_qs "
                            f"{eval_num_qs} leaves none to score",
                            "lower --eval_num_qs, or leave the group out with --eval_groups")
