"""Optional Weights & Biases logging that can never stop a training run.

Modes: ``off`` (wandb not imported), ``online`` (needs credentials, else fails at start-up),
``offline`` (``finish()`` prints the ``wandb sync`` line), ``auto`` (``WANDB_MODE`` if set, else
online when credentials exist, else offline). A failing start falls back to offline, then off;
a failing ``log`` warns once and stops logging. metrics.jsonl stays the record either way.
"""

from __future__ import annotations

import netrc
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MODES = ("auto", "online", "offline", "off")

# metrics.jsonl key -> dashboard name, by section; dict-valued keys get "/<group>" appended.
_SCALARS = {
    "train_loss": "loss/train_mean", "dp_epsilon": "privacy/epsilon", "wall_time_s": "time/wall_s",
    "grad_steps": "compute/grad_steps", "points": "compute/points",
    "eval_group_specificity": "group_use/specificity", "eval_group_specificity_se": "group_use/specificity_se",
    "eval_alignment_score": "alignment/eval_mean", "eval_worst_alignment": "alignment/eval_worst",
    "eval_bottom_quarter_alignment": "alignment/eval_bottom_quarter",
    "eval_alignment_seen": "alignment/eval_seen", "eval_alignment_unseen": "alignment/eval_unseen",
    "eval_worst_alignment_seen": "alignment/eval_worst_seen",
    "eval_worst_alignment_unseen": "alignment/eval_worst_unseen",
    "train_alignment_score": "alignment/train_heldout_mean", "train_worst_alignment": "alignment/train_heldout_worst",
    "train_bottom_quarter_alignment": "alignment/train_heldout_bottom_quarter",
    "train_alignment_seen": "alignment/train_heldout_seen", "train_alignment_unseen": "alignment/train_heldout_unseen",
    "eval_fi": "fairness/eval_fi", "eval_cov": "fairness/eval_cov", "eval_alignment_gap": "fairness/eval_gap",
    "eval_fi_seen": "fairness/eval_fi_seen", "eval_fi_unseen": "fairness/eval_fi_unseen",
    "train_fi": "fairness/train_fi", "train_cov": "fairness/train_cov", "train_alignment_gap": "fairness/train_gap",
}
_PER_GROUP = {"train_loss_per_client": "loss/client", "context_controls": "group_use/context",
              "eval_group_scores": "alignment/eval", "train_group_scores": "alignment/train_heldout",
              "eval_group_specificity_per_group": "group_use/specificity"}
# counts and curves that are tables, not per-round scalars: kept in metrics.jsonl and summary.json
_SKIP = {"round", "eval_questions_seen", "eval_questions_unseen", "train_questions_seen", "train_questions_unseen",
         "train_worst_alignment_seen", "train_worst_alignment_unseen", "train_fi_seen", "train_fi_unseen",
         "eval_specificity_context", "context_curve"}


def wandb_metrics(record: dict[str, Any]) -> dict[str, Any]:
    """A metrics.jsonl record under grouped dashboard names; unknown keys under ``other/<key>``."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if value is None or key in _SKIP:
            continue
        if key in _SCALARS:
            out[_SCALARS[key]] = value
            continue
        if key == "baselines":  # {kind: {metric: value}}: the scalars only, per-group scores stay in the file
            out.update({f"baseline/{kind}/{m}": v for kind, vals in value.items() for m, v in vals.items()
                        if v is not None and not isinstance(v, dict)})
            continue
        prefix = _PER_GROUP.get(key, f"other/{key}")
        if isinstance(value, dict):  # a "/" inside a group name would open a spurious dashboard section
            out.update({f"{prefix}/{str(g).replace('/', '-')}": v for g, v in value.items() if v is not None})
        else:
            out[prefix] = value
    return out


def has_wandb_credentials() -> bool:
    """Whether wandb could authenticate, judged from env vars and the netrc file only."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    for path in [os.environ["NETRC"]] if "NETRC" in os.environ else ["~/.netrc", "~/_netrc"]:
        try:
            creds = netrc.netrc(Path(path).expanduser()).authenticators(host or "")
        except (OSError, netrc.NetrcParseError):
            continue
        if creds and creds[2]:
            return True
    return False


def _resolve_mode(mode: str) -> tuple[str, str]:
    if mode not in MODES:
        raise ValueError(f"wandb mode {mode!r} is not one of {MODES}")
    if mode != "auto":
        return mode, "requested"
    env_mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if env_mode in ("offline", "dryrun"):
        return "offline", "WANDB_MODE=" + env_mode
    if env_mode == "disabled" or os.environ.get("WANDB_DISABLED", "").lower() in ("true", "1"):
        return "off", "wandb disabled by environment"
    if env_mode in ("online", "run"):
        return "online", "WANDB_MODE=" + env_mode
    if has_wandb_credentials():
        return "online", "API key found"
    return "offline", "no API key found (WANDB_API_KEY or netrc)"


class WandbLogger:
    def __init__(self, mode: str = "auto", project: str = "plurallm", run_name: str | None = None,
                 config: dict[str, Any] | None = None, dir: str | Path = "runs", group: str | None = None):
        self.mode, why = _resolve_mode(mode)
        self.run: Any = None
        self._failed_log = False
        if self.mode == "off":
            return
        if mode == "online" and not has_wandb_credentials():
            raise RuntimeError("wandb mode 'online' was requested but no W&B credentials were found\n  hint: run "
                               "`wandb login` (or set WANDB_API_KEY), or choose wandb mode 'offline' or 'off'")
        # wandb's own banners would interleave with the progress bar; we print our own lines.
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as e:
            if mode == "auto":
                warnings.warn("wandb is not installed; W&B logging is off", stacklevel=2)
                self.mode = "off"
                return
            raise ImportError(f"wandb mode {mode!r} needs the wandb package\n  hint: pip install "
                              "wandb, or choose wandb mode 'off'") from e
        self._wandb = wandb
        Path(dir).mkdir(parents=True, exist_ok=True)
        self.run = self._start(dict(project=project, name=run_name, config=config or {}, group=group, dir=str(dir)))
        if self.run is not None:
            print(f"wandb: logging online ({why}): {getattr(self.run, 'url', '')}" if self.mode == "online"
                  else f"wandb: logging offline ({why}) to {self.sync_dir}")

    def _start(self, init_kwargs: dict[str, Any]) -> Any:
        """Start a run, degrading online -> offline -> off instead of raising."""
        for attempt in ("online", "offline") if self.mode == "online" else ("offline",):
            # console capture would duplicate stdout/tqdm into the run; the run folder has the logs
            settings = self._wandb.Settings(mode=attempt, console="off", init_timeout=60)
            try:
                run = self._wandb.init(settings=settings, reinit="finish_previous", **init_kwargs)
            except Exception as e:  # network, auth or filesystem: never fatal for training
                warnings.warn(f"wandb.init ({attempt}) failed: {e!r}; "
                              + ("falling back to offline" if attempt == "online"
                                 else "W&B logging is off for this run"), stacklevel=3)
                continue
            self.mode = attempt
            return run
        self.mode = "off"
        return None

    @property
    def sync_dir(self) -> Path | None:
        """The offline run folder that ``wandb sync`` uploads (None when not logging)."""
        return None if self.run is None else Path(self.run.dir).parent  # run.dir is <sync_dir>/files

    def _guard(self, what: str, call: Any) -> None:
        if self.run is None or self._failed_log:
            return
        try:
            call(self.run)
        except Exception as e:
            self._failed_log = True
            warnings.warn(f"wandb {what} failed: {e!r}; W&B logging stops here "
                          "(metrics.jsonl is unaffected)", stacklevel=3)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self._guard("log", lambda run: run.log(metrics, step=step))

    def summary(self, values: dict[str, Any]) -> None:
        self._guard("summary", lambda run: run.summary.update(values))

    def finish(self) -> None:
        """Close the run (idempotent); for offline runs print how to upload them."""
        if self.run is None:
            return
        run, sync_dir, offline = self.run, self.sync_dir, self.mode == "offline"
        self.run = None
        try:
            run.finish()
        except Exception as e:
            warnings.warn(f"wandb finish failed: {e!r}", stacklevel=2)
        if offline:
            print(f"wandb: offline run saved; to upload it run:\n  wandb sync {sync_dir}")
