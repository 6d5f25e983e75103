"""The run loop shared by FedAvg and the centralized baseline: (resume) → evaluate round 0 → for each
round: train, log the loss, and every `eval_every` rounds (and at the end) evaluate, write metrics,
checkpoint. A "round" is a communication round for FedAvg and an epoch for the centralized baseline."""
from __future__ import annotations

import shutil
import sys
import time
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from federated.comm import human_bytes
from orchestration.run_figures import write_run_figures
from training.evaluation import group_stats
from training.local import DivergenceError, StopTraining
from utils.atomic_write import atomic_write_bytes, remove_stale_temps
from utils.checkpoint import (
    alias_checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    round_tag,
    save_checkpoint,
)
from utils.console import format_group_table
from utils.distances import NonFiniteError
from utils.jsonl_log import MetricsWriter, check_rounds_increase, lost_log_error, read_metrics, trim_metrics
from utils.metrics import LOSS_WINDOW_ROUNDS, curve_convergence_round
from utils.run_folder import RunDir
from utils.wandb_logger import WandbLogger, wandb_metrics


@dataclass(frozen=True)
class LoopConfig:
    rounds: int
    eval_every: int
    convergence_threshold: float = 0.95
    convergence_window: int = LOSS_WINDOW_ROUNDS  # rounds in the centred moving average
    save_client: bool = False
    keep_checkpoints: int = 3     # newest resumable round checkpoints kept; final and best are aliases
    keep_best: bool = False
    log_every: int = 10           # plain progress line every N rounds when stderr is not a terminal
    plots: bool = True            # loss.png and alignment.png in the run folder at the end


# metrics.jsonl key suffix -> group_stats key, in the order the records hold them
_STATS = (("alignment_score", "alignment_score"), ("group_scores", "group_scores"), ("cov", "cov"), ("fi", "fi"),
          ("worst_alignment", "worst"), ("alignment_gap", "gap"), ("bottom_quarter_alignment", "bottom_quarter"))


def eval_record(round_: int, evals, trains, window_losses: list[dict], grad_steps: int,
                points: int, wall: float) -> dict:
    per_client: dict[str, list[float]] = {}
    for w in window_losses:
        for n, v in w["train_loss_per_client"].items():
            per_client.setdefault(n, []).append(v)
    mean_loss = sum(w["train_loss"] for w in window_losses) / len(window_losses) if window_losses else None
    rec = {"round": round_, "train_loss": mean_loss,
           "train_loss_per_client": {n: sum(v) / len(v) for n, v in sorted(per_client.items())}}
    for prefix, scored in (("eval", evals), ("train", trains)):
        stats = group_stats(scored)
        rec.update({f"{prefix}_{key}": stats[name] for key, name in _STATS})
    rec["grad_steps"], rec["points"], rec["wall_time_s"] = grad_steps, points, round(wall, 3)
    return rec


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


class ProgressLines:
    """Plain lines for log files (nohup, job scripts), where tqdm draws nothing: every
    `every` rounds and at every evaluation, with the loss, alignment, speed and ETA."""

    def __init__(self, method: str, rounds: int, start_round: int, every: int, log):
        self.method, self.rounds, self.start, self.every, self.log = method, rounds, start_round, every, log
        self.enabled = not sys.stderr.isatty()
        self.t0 = time.perf_counter()

    def __call__(self, rnd: int, loss: float, rec: dict | None, last: dict | None, server: dict) -> None:
        if not self.enabled or not (rec is not None or (self.every and rnd % self.every == 0)):
            return
        per = (time.perf_counter() - self.t0) / max(1, rnd - self.start)
        parts = [f"{self.method} round {rnd}/{self.rounds}", f"loss {loss:.4f}"]
        shown = rec or last
        if shown is not None and shown.get("eval_alignment_score") is not None:
            worst = shown.get("eval_worst_alignment")
            parts.append(f"eval alignment {shown['eval_alignment_score']:.4f}"
                         + (f" (worst group {worst:.4f})" if worst is not None else "")
                         + ("" if rec is not None else f" at round {shown['round']}"))
            optional = (("unseen questions", shown.get("eval_alignment_unseen"), ".4f"),
                        ("consensus", (shown.get("baselines") or {}).get("consensus", {}).get("eval_alignment_score"),
                         ".4f"), ("specificity", shown.get("eval_group_specificity"), "+.4f"))
            parts += [f"{label} {value:{fmt}}" for label, value, fmt in optional if value is not None]
        if "dp_epsilon" in server:
            parts.append(f"ε {server['dp_epsilon']:.2f}")
        if rec is not None and rec.get("comm_bytes_total"):
            parts.append(f"comm {human_bytes(rec['comm_bytes_total'])}")
        parts.append(f"{per:.2f} s/round, ETA {_duration(per * (self.rounds - rnd))}")
        self.log(" | ".join(parts))


class RunLoop:
    def __init__(self, trainer, cfg: LoopConfig, run_dir: RunDir, wandb: WandbLogger, log=print):
        self.trainer, self.cfg, self.run_dir, self.wandb, self.log = trainer, cfg, run_dir, wandb, log
        self.logs, self.ckpt_dir = (run_dir.metrics_path, run_dir.losses_path), run_dir.checkpoint_dir
        self.start_round, self.grad_steps, self.points, self.wall_offset = 0, 0, 0, 0.0
        self.comm = {"down": 0, "up": 0}  # cumulative bytes (federated/comm.py); stay 0 for the centralized baseline
        self.best: tuple[float, int] | None = None  # (mean eval alignment, round) of --keep_best
        self.current_round = 0  # what an interrupt reports
        self.resumed = False
        self.stopped: str | None = None  # why the run ended before cfg.rounds (StopTraining)

    # --- resume -------------------------------------------------------------------
    def resume(self) -> None:
        """Continue from the latest complete checkpoint; drop metrics written after it."""
        self._remove_stale_temps()
        tag = latest_checkpoint(self.ckpt_dir)
        if tag is None:  # killed before the round-0 checkpoint: anything logged so far is redone
            self._trim(-1)
            self.log(f"no complete checkpoint in {self.ckpt_dir}; starting from round 0")
            return
        weights, extra, meta = load_checkpoint(self.ckpt_dir, tag)
        self._check_logs_there(int(meta["round"]))
        self.trainer.load_global(weights)
        self.trainer.load_state_dict(extra["trainer"])
        if "torch_rng" in extra:  # --dropout draws from torch's global generator: continue its stream
            torch.set_rng_state(extra["torch_rng"])
        self.start_round, self.grad_steps = int(meta["round"]), int(meta["grad_steps"])
        self.points = int(meta.get("points", 0))
        self.wall_offset = float(meta["wall_time_s"])
        self._trim(self.start_round)
        records, losses = self._read_logs()
        # the cumulative bytes are the sum of the rounds kept (a log from before counting has none)
        self.comm = {k: sum(r.get(f"comm_bytes_{k}", 0) for r in losses) for k in ("down", "up")}
        self.best = max(((r["eval_alignment_score"], r["round"]) for r in records
                         if r.get("eval_alignment_score") is not None), default=None)
        self.log(f"resumed from checkpoint {tag} (round {self.start_round}) in {self.run_dir.path}")
        self.resumed = True

    def _remove_stale_temps(self) -> None:
        """Temp files of writes the interrupted process never finished (we hold the run lock)."""
        clients = self.ckpt_dir / "clients"
        folders = [self.run_dir.path, self.ckpt_dir, *(clients.iterdir() if clients.is_dir() else [])]
        freed = sum(remove_stale_temps(f) for f in folders)
        if freed:
            self.log(f"removed temporary files ({freed / 1e6:.3g} MB) left by an interrupted write")

    def _check_logs_there(self, round_: int) -> None:
        """Every checkpoint comes after its round's records: a log missing beside one was deleted."""
        for path in self.logs:
            if not path.exists() and (round_ > 0 or path == self.logs[0]):
                raise lost_log_error(path, f"is missing, but the run has a checkpoint of round {round_}")

    def _read_logs(self) -> list[list[dict]]:
        """metrics.jsonl and losses.jsonl (absent: none yet), their rounds checked to increase."""
        logs = [read_metrics(p) if p.exists() else [] for p in self.logs]
        for path, recs in zip(self.logs, logs):
            check_rounds_increase(path, recs)
        return logs

    def _trim(self, last_round: int) -> None:
        for path in self.logs:
            if path.exists():
                dropped = trim_metrics(path, last_round)
                if dropped:
                    self.log(f"dropped {dropped} records after round {last_round} from {path.name} "
                             "(written after the checkpoint the run resumes from)")

    # --- the loop -----------------------------------------------------------------
    def run(self) -> dict:
        try:
            return self._run()
        except KeyboardInterrupt as err:  # Ctrl-C or SIGTERM: say where, let the caller exit 130/143
            err.round = self.current_round
            raise

    def _run(self) -> dict:
        t0 = time.perf_counter() - self.wall_offset
        losses = MetricsWriter(self.logs[1])
        if not self.resumed:  # resumed from round 0's checkpoint: round 0 is logged already
            self._evaluate(0, [], t0)
        window: list[dict] = []
        method, last = self.trainer.method, None
        bar = tqdm(range(self.start_round + 1, self.cfg.rounds + 1), desc=method, unit="round", dynamic_ncols=True,
                   disable=None)
        lines = ProgressLines(method, self.cfg.rounds, self.start_round, self.cfg.log_every, self.log)
        for rnd in bar:
            self.current_round = rnd
            try:
                stats = self.trainer.train_round(rnd)
            except StopTraining as stop:  # nothing of round rnd was released: end at rnd - 1
                self.stopped = f"{str(stop).splitlines()[0]} (stopped before round {rnd})"
                self.log(f"{method}: {self.stopped}")
                if window:
                    self._evaluate(rnd - 1, window, t0)
                break
            server = stats.get("server") or {}  # e.g. DP: noise std, clipped clients, ε spent so far
            window.append(self._log_round(losses, rnd, stats, server))
            rec = None
            if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
                rec = last = self._evaluate(rnd, window, t0)
                window = []
            eps = {"eps": f"{server['dp_epsilon']:.2f}"} if "dp_epsilon" in server else {}
            bar.set_postfix({"loss": f"{stats['train_loss']:.3f}",
                             "align": "-" if last is None else f"{last['eval_alignment_score']:.4f}", **eps})
            lines(rnd, stats["train_loss"], rec, last, server)
        losses.close()
        return self._finish(t0)

    def _log_round(self, losses: MetricsWriter, rnd: int, stats: dict, server: dict) -> dict:
        """Count the round's compute and bytes, and write its losses.jsonl row (and W&B); returns the row."""
        self.grad_steps += stats["grad_steps"]
        self.points += stats["points"]
        comm = stats.get("comm") or {}  # none for a centralized epoch
        if comm:
            self.comm = {k: total + comm[f"comm_bytes_{k}"] for k, total in self.comm.items()}
            comm = {**comm, **{f"comm_bytes_{k}_total": total for k, total in self.comm.items()}}
        row = {"round": rnd, "train_loss": stats["train_loss"], "train_loss_per_client": stats["train_loss_per_client"],
               "grad_steps": self.grad_steps, "points": self.points, **server, **comm}
        losses.write(row)
        comm = {f"comm/{k.removeprefix('comm_')}": v for k, v in row.items() if k.startswith("comm_")}
        self.wandb.log({"loss/train_mean": stats["train_loss"], "compute/grad_steps": self.grad_steps,
                        "compute/points": self.points, **{f"server/{k}": v for k, v in server.items()}, **comm},
                       step=rnd)
        return row

    def _evaluate(self, rnd: int, window: list[dict], t0: float) -> dict:
        try:
            evals, trains = self.trainer.evaluate(rnd)
        except NonFiniteError as err:  # finite but huge weights (e.g. DP noise) predict NaN: a divergence
            if err.name != "pred":
                raise
            raise DivergenceError(rnd, err.group or "?", f"predictions are NaN/inf at evaluation in "
                                  f"question(s) {err.questions}") from None
        rec = eval_record(rnd, evals, trains, window, self.grad_steps, self.points, time.perf_counter() - t0)
        diagnostics = getattr(self.trainer, "diagnostics", None)  # the Flower engine's server holds no data
        if diagnostics is not None:
            final = rnd == self.cfg.rounds or self.stopped is not None
            rec.update(diagnostics.record(rnd, evals, trains, self.trainer.global_state, final))
        if window and "dp_epsilon" in window[-1]:
            rec["dp_epsilon"] = window[-1]["dp_epsilon"]  # privacy spent by the weights just evaluated
        if self.comm["down"] or self.comm["up"] or self.trainer.method == "fedavg":
            rec["comm_bytes_total"] = self.comm["down"] + self.comm["up"]  # to reach the weights just evaluated
        self.run_dir.log_metrics(rec)
        self.wandb.log(wandb_metrics(rec), step=rnd)
        tag = round_tag(rnd)
        self._checkpoint(tag, rnd, rec["wall_time_s"])
        if self.cfg.keep_best and (self.best is None or rec["eval_alignment_score"] > self.best[0]):
            self.best = (rec["eval_alignment_score"], rnd)
            alias_checkpoint(self.ckpt_dir, tag, "best", {"eval_alignment_score": rec["eval_alignment_score"]})
        # `final` and `best` are indexes naming a round's files, which outlive that round's pruning
        for pruned in prune_checkpoints(self.ckpt_dir, self.cfg.keep_checkpoints):
            shutil.rmtree(self.ckpt_dir / "clients" / pruned, ignore_errors=True)
        return rec

    def _checkpoint(self, tag: str, rnd: int, wall: float) -> None:
        extra = {"trainer": self.trainer.state_dict(), "torch_rng": torch.get_rng_state()}
        meta = {"round": rnd, "grad_steps": self.grad_steps, "points": self.points, "wall_time_s": wall,
                "method": self.trainer.method}
        weights = {k: v.detach().cpu().contiguous() for k, v in self.trainer.global_state.items()}
        save_checkpoint(self.ckpt_dir, tag, model_state=weights, extra_states=extra, meta=meta)
        if not self.cfg.save_client:
            return
        folder = self.ckpt_dir / "clients" / tag  # each client's weights of the last round (the released code's)
        folder.mkdir(parents=True, exist_ok=True)
        for name, state in getattr(self.trainer, "last_client_states", {}).items():
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
            atomic_write_bytes(folder / f"{safe}.safetensors", blob)

    def _finish(self, t0: float) -> dict:
        self.run_dir.close()
        self._check_logs_there(self.current_round)
        records, losses = self._read_logs()
        wall = time.perf_counter() - t0
        # The last round is always evaluated and checkpointed: `final` names its files, no copy.
        alias_checkpoint(self.ckpt_dir, round_tag(records[-1]["round"]), "final", {"wall_time_s": round(wall, 3)})
        summary = build_summary(records, losses, self.cfg, wall)
        summary["pooling_bytes"] = getattr(self.trainer, "pooling_bytes", None)
        if self.stopped:
            summary["stopped_early"] = self.stopped
        self.run_dir.write_summary(summary)
        if self.cfg.plots:
            write_run_figures(self.run_dir.path)
        self.wandb.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
        last = records[-1]
        self.log(format_group_table(last["eval_group_scores"], last["train_group_scores"],
                                    last["eval_cov"], last["eval_fi"], last["train_cov"], last["train_fi"],
                                    title=f"{self.trainer.method}: round {last['round']} (mean eval alignment "
                                          f"{last['eval_alignment_score']:.4f}, weighted by questions)"))
        return summary


def build_summary(records: list[dict], losses: list[dict], cfg: LoopConfig, wall: float) -> dict:
    final = records[-1]
    best = max(records, key=lambda r: r["eval_alignment_score"])
    conv = curve_convergence_round([r["round"] for r in losses], [r["train_loss"] for r in losses],
                                   threshold=cfg.convergence_threshold, window=cfg.convergence_window)
    at_conv = next((r for r in losses if r["round"] == conv), {})
    return {
        "rounds": final["round"], "final_eval_alignment_score": final["eval_alignment_score"],
        "best_eval_alignment_score": best["eval_alignment_score"], "best_round": best["round"],
        **{f"final_{k}": final.get(k) for k in ("eval_fi", "eval_cov", "eval_worst_alignment", "eval_alignment_gap",
                                                "eval_bottom_quarter_alignment", "train_worst_alignment",
                                                "train_alignment_score", "train_fi", "train_cov")},
        "final_train_loss": losses[-1]["train_loss"] if losses else None,
        "convergence_round": conv, "convergence_grad_steps": at_conv.get("grad_steps"),
        "convergence_points": at_conv.get("points"),
        "convergence": {"threshold": cfg.convergence_threshold, "smoothing": "centred moving average",
                        "window_rounds": cfg.convergence_window},
        "dp_epsilon": final.get("dp_epsilon"),  # privacy spent by the final weights (DP runs)
        **comm_summary(losses, at_conv),
        "total_grad_steps": final["grad_steps"], "total_points": final.get("points"), "wall_time_s": round(wall, 3),
        "final_eval_group_scores": final["eval_group_scores"],
        **diagnostics_summary(final, best),
    }


def comm_summary(losses: list[dict], at_conv: dict) -> dict:
    """Totals and bytes to convergence (federated/comm.py); empty for runs that count none."""
    if not any("comm_bytes_down" in r for r in losses):
        return {}
    down = sum(r.get("comm_bytes_down", 0) for r in losses)
    up = sum(r.get("comm_bytes_up", 0) for r in losses)
    conv = (at_conv.get("comm_bytes_down_total", 0) + at_conv.get("comm_bytes_up_total", 0)) if at_conv else None
    return {"total_comm_bytes_down": down, "total_comm_bytes_up": up, "total_comm_bytes": down + up,
            "comm_bytes_per_round": (down + up) / len(losses), "convergence_comm_bytes": conv}


# What the summary keeps of the diagnostics (training/diagnostics.py); absent on the Flower engine.
_FINAL_DIAGNOSTICS = ("eval_alignment_seen", "eval_alignment_unseen", "eval_worst_alignment_seen",
                      "eval_worst_alignment_unseen", "eval_fi_seen", "eval_fi_unseen", "eval_questions_seen",
                      "eval_questions_unseen", "train_alignment_seen", "train_alignment_unseen",
                      "eval_group_specificity", "eval_group_specificity_se", "eval_group_specificity_per_group")


def diagnostics_summary(final: dict, best: dict) -> dict:
    if "baselines" not in final:
        return {}
    out = {f"final_{k}": final.get(k) for k in _FINAL_DIAGNOSTICS}
    out["best_eval_alignment_unseen"] = best.get("eval_alignment_unseen")
    out["baselines"] = final["baselines"]
    out["beats_consensus"] = final["eval_alignment_score"] > final["baselines"]["consensus"]["eval_alignment_score"]
    for k in ("context_controls", "context_curve", "eval_specificity_context"):
        if k in final:
            out[k] = final[k]
    return out
