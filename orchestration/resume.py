"""Which run folder a command writes to, and whether it continues an earlier run.

A run is identified by what decides its numbers: flags, data (content hash, not path), embedding
model, groups, model shape. Flags that only change where output goes or how fast it is computed
may differ between the interrupted command and the resuming one.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, fields
from pathlib import Path

from models.gpo import GPOConfig
from orchestration.cli import flag_defaults
from utils.atomic_write import atomic_write_json
from utils.errors import DataError
from utils.run_folder import FAILED, RunDir, default_run_dir, is_finished, read_failure, read_json
from utils.run_lock import RunLock

RUNS_ROOT = "runs"

# Keys of config.json that do not change a run's numbers (or are outputs of the run).
VOLATILE = frozenset({
    "resume", "out_dir", "quiet", "wandb", "wndb_project_name", "environment", "device",
    "device_resolved", "data_path", "cache_dir", "emb_device", "emb_batch_size", "also_centralized",
    "client_engine", "client_engine_resolved", "client_workers", "eval_batch_size", "save_client",
    "engine", "round_timeout", "node_wait", "sim_backend", "sim_client_cpus", "sim_client_gpus",
    "encoding", "log_every", "keep_checkpoints", "keep_best", "no_plots",
})
_DATA_IDENTITY = ("source_hash", "kept_questions")
_EMBEDDING_IDENTITY = ("model_id", "dim", "prompt_style", "precision")

# Flags removed in issue 25, with the value every saved config that has them holds when the flag
# did nothing (--model had one choice; --vmap_chunk 0 is the default, unused off vmap; --precision
# fp32 is what the model computes in): at that value the key (also in model_config) is ignored,
# any other value is a retired setting.
REMOVED_FLAGS = {"model": "gpo", "vmap_chunk": 0, "precision": "fp32"}
# Choices removed from flags that remain (benchmarks/README.md, "Retired"): this code cannot run them.
RETIRED_CHOICES = {"client_engine": "vmap"}


def retired_settings(config: dict) -> list[str]:
    """'key: value was retired' for each removed flag away from its old default or retired choice
    in a saved config: a run that used one can be neither resumed nor reused."""
    used = [k for k, v in REMOVED_FLAGS.items() if k in config and config[k] != v]
    used += [k for k, v in RETIRED_CHOICES.items() if config.get(k) == v]
    return [f"{k}: {config[k]!r} was retired (issue 25; benchmarks/README.md says why)" for k in used]


def _removed(k: str, v) -> bool:
    return k in REMOVED_FLAGS and v == REMOVED_FLAGS[k]


def run_identity(config: dict) -> dict:
    """The part of a resolved config that decides the run's numbers."""
    ident = {k: v for k, v in config.items() if k not in VOLATILE and k != "data" and not _removed(k, v)}
    if isinstance(ident.get("model_config"), dict):
        ident["model_config"] = {k: v for k, v in ident["model_config"].items() if not _removed(k, v)}
    data = config.get("data") or {}
    ident["data"] = {k: data.get(k) for k in _DATA_IDENTITY}
    emb = data.get("embedding") or {}
    ident["data"]["embedding"] = {k: emb.get(k) for k in _EMBEDDING_IDENTITY}
    return ident


def fingerprint(config: dict) -> str:
    """Hash of the identity with keys at their added-flag defaults dropped, so a folder from
    before a flag existed and one written now with the flag at its default hash alike."""
    ident = _without_defaults(run_identity(config), added_defaults(config.get("method")))
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _without_defaults(ident: dict, defaults: dict, prefix: str = "") -> dict:
    return {k: _without_defaults(v, defaults, f"{prefix}{k}.") if isinstance(v, dict) else v
            for k, v in ident.items() if not (f"{prefix}{k}" in defaults and v == defaults[f"{prefix}{k}"])}


def added_defaults(method: str | None) -> dict:
    """Dotted key -> default of every flag and model field. A folder written before a flag existed
    lacks its key, and each new flag's default is the old behaviour, so such a key is no difference."""
    flags = flag_defaults(method if method in ("fedavg", "centralized") else "fedavg")
    return {**flags, **{f"model_config.{f.name}": f.default for f in fields(GPOConfig) if f.name != "dim_x"}}


def differences(saved: dict, wanted: dict) -> list[str]:
    """'key: saved -> wanted' for every identity key that differs (nested keys dotted), or only the
    retired settings the saved run used, if any."""
    retired = retired_settings(saved)
    if retired:
        return retired
    a, b = run_identity(saved), run_identity(wanted)
    defaults = added_defaults(saved.get("method"))
    return [f"{k}: {x!r} -> {y!r}" for k, x, y in _diff(a, b, "", defaults)]


_MISSING = object()


def _diff(a, b, prefix, defaults):
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k, _MISSING), b.get(k, _MISSING)
        key = f"{prefix}{k}"
        if isinstance(x, dict) and isinstance(y, dict):
            yield from _diff(x, y, f"{key}.", defaults)
        elif x is _MISSING and key in defaults and y == defaults[key]:
            continue  # a flag added after this run started, left at its (old-behaviour) default
        elif x != y:
            yield key, None if x is _MISSING else x, None if y is _MISSING else y


def read_config(folder: Path) -> dict:
    return read_json(folder / "config.json", hint="the run folder is damaged; delete it or point --out_dir elsewhere")


def mark_failed(folder: Path, reason: str, **details) -> Path:
    """A run that cannot go on (it diverged): never mistaken for an interrupted one."""
    return atomic_write_json(folder / FAILED, {"reason": reason, **details,
                                               "time": time.strftime("%Y-%m-%dT%H:%M:%S")})


def find_latest(root: Path, method: str, config: dict) -> Path | None:
    """The newest folder under `root` holding a run of `method` with this config's identity."""
    if not root.is_dir():
        return None
    want = fingerprint(config)
    candidates = []
    for cfg_path in root.glob("*/config.json"):
        try:
            saved = json.loads(cfg_path.read_text())
        except (OSError, ValueError):
            continue  # a damaged folder is not a candidate; it is named only if pointed at
        if saved.get("method") == method and fingerprint(saved) == want and read_failure(cfg_path.parent) is None:
            candidates.append((cfg_path.stat().st_mtime, cfg_path.parent.name, cfg_path.parent))
    return max(candidates)[2] if candidates else None


@dataclass
class RunPlan:
    run_dir: RunDir
    resume: bool        # continue from the latest checkpoint in run_dir
    finished: bool      # nothing left to do: the summary is already there
    lock: RunLock       # held until the run ends (release it then): one process per folder


def plan_run(run, config: dict, out_dir=None, log=print) -> RunPlan:
    """Decide the folder: a new one, the one --out_dir names, or (--resume alone) the latest match.

    The folder is locked before anything in it is read for a decision or written, and stays
    locked in the returned plan (release it when the run ends)."""
    method, resume = run.method, run.output.resume
    folder = Path(out_dir) if out_dir else None
    if resume and folder is None:
        folder = find_latest(Path(RUNS_ROOT), method, config)
        if folder is None:
            log(f"--resume: no earlier {method} run with this configuration under {RUNS_ROOT}/; starting a new one")
            resume = False
    if resume and not (folder / "config.json").exists():
        raise DataError(f"--resume: {folder} holds no run (no config.json)",
                        "point --out_dir at the folder of the run to continue, or drop --resume")
    folder = folder or default_run_dir(method, run.client.seed, RUNS_ROOT)
    lock = RunLock(folder).acquire()
    try:
        if not resume and _holds_run(folder):
            raise DataError(f"--out_dir {out_dir} already holds a run (config.json and outputs are there)",
                            "add --resume to continue it, or choose another --out_dir (or delete that folder)")
        finished = resume and _continue(folder, method, config, log)
        run_dir = RunDir(folder)
        if not resume:
            run_dir.write_config(config)
    except BaseException:
        lock.release()
        raise
    return RunPlan(run_dir, resume, finished, lock)


def _holds_run(folder: Path) -> bool:
    return (folder / "config.json").exists() and any(
        (folder / name).exists() for name in ("metrics.jsonl", "losses.jsonl", "checkpoints", FAILED))


def _check_same_run(folder: Path, saved: dict, method: str) -> None:
    """A folder --resume cannot continue: another method's run, one that failed, or one with a retired setting."""
    if saved.get("method") != method:
        raise DataError(f"--resume: {folder} holds a {saved.get('method')!r} run, not {method!r}",
                        "resume it with its own entry point, or point --out_dir elsewhere")
    failed = read_failure(folder)
    if failed is not None:
        raise DataError(f"--resume: the run in {folder} failed ({failed.get('reason')}); resuming would fail again",
                        "start a new run without --resume (another --out_dir), e.g. with a lower --lr or --grad_clip")
    retired = retired_settings(saved)
    if retired:
        raise DataError(f"--resume: the run in {folder} used a setting this code no longer runs: " + "; ".join(retired),
                        "start a new run without --resume")


_RERUN_HINT = "rerun the same command as the interrupted run (plus --resume), or start a new run without --resume"


def check_resume_early(run) -> None:
    """What --resume --out_dir can refuse from the flags alone, before minutes of loading and
    embedding: another method or dataset, or a failed run. plan_run checks everything else."""
    folder = Path(run.output.out_dir) if run.output.resume and run.output.out_dir else None
    if folder is None or not (folder / "config.json").exists():
        return
    saved = read_config(folder)
    if saved.get("method") == run.method and saved.get("dataset") != run.data.dataset:
        raise DataError(f"--resume: the run in {folder} is on --dataset {saved.get('dataset')}, not "
                        f"{run.data.dataset}", _RERUN_HINT)
    _check_same_run(folder, saved, run.method)


def _continue(folder: Path, method: str, config: dict, log) -> bool:
    """Refuse a folder --resume cannot continue with these flags; whether its run is finished."""
    saved = read_config(folder)
    _check_same_run(folder, saved, method)
    diff = differences(saved, config)
    if diff:
        raise DataError(f"--resume: the flags differ from the run in {folder}: " + "; ".join(diff), _RERUN_HINT)
    finished = is_finished(folder)
    log(f"--resume: {'already finished' if finished else 'continuing'} run {folder}")
    return finished
