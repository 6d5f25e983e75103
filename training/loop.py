"""The run loop shared by FedAvg and the centralized baseline.

Read it top to bottom: (resume) → evaluate round 0 → for each round: train, log the loss,
and every `eval_every` rounds (and at the end) evaluate, write metrics, checkpoint.
A "round" is a communication round for FedAvg and an epoch for the centralized baseline.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from safetensors.torch import save as save_safetensors
from tqdm import tqdm

from training.evaluation import GroupEval
from utils.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from utils.console import format_group_table
from utils.metrics import convergence_round, cov, fairness_index, mean_alignment
from utils.run_io import MetricsWriter, RunDir, atomic_write_bytes, read_metrics, trim_metrics
from utils.wandb_logger import WandbLogger, wandb_metrics

@dataclass
class LoopConfig:
    rounds: int
    eval_every: int
    convergence_threshold: float = 0.95
    convergence_window: int = 21  # rounds in the centred moving average (loss logged every round)
    save_client: bool = False


def group_stats(evals: dict[str, GroupEval]) -> dict:
    """Mean (question-weighted) alignment, per-group scores, CoV and FI of a set of groups."""
    if not evals:
        return {"alignment_score": None, "group_scores": {}, "cov": None, "fi": None}
    scores = {n: e.score for n, e in sorted(evals.items())}
    return {"alignment_score": mean_alignment({n: e.distances for n, e in evals.items()}),
            "group_scores": scores, "cov": cov(list(scores.values())),
            "fi": fairness_index(list(scores.values()))}


def eval_record(round_: int, evals, trains, window_losses: list[dict], grad_steps: int,
                points: int, wall: float) -> dict:
    e, t = group_stats(evals), group_stats(trains)
    rec = {"round": round_}
    if window_losses:
        per_client: dict[str, list[float]] = {}
        for w in window_losses:
            for n, v in w["train_loss_per_client"].items():
                per_client.setdefault(n, []).append(v)
        rec["train_loss"] = sum(w["train_loss"] for w in window_losses) / len(window_losses)
        rec["train_loss_per_client"] = {n: sum(v) / len(v) for n, v in sorted(per_client.items())}
    else:
        rec["train_loss"], rec["train_loss_per_client"] = None, {}
    for prefix, s in (("eval", e), ("train", t)):
        rec[f"{prefix}_alignment_score"] = s["alignment_score"]
        rec[f"{prefix}_group_scores"] = s["group_scores"]
        rec[f"{prefix}_cov"], rec[f"{prefix}_fi"] = s["cov"], s["fi"]
    rec["grad_steps"], rec["points"], rec["wall_time_s"] = grad_steps, points, round(wall, 3)
    return rec


class RunLoop:
    def __init__(self, trainer, cfg: LoopConfig, run_dir: RunDir, wandb: WandbLogger, log=print):
        self.trainer, self.cfg, self.run_dir, self.wandb, self.log = trainer, cfg, run_dir, wandb, log
        self.losses_path = run_dir.path / "losses.jsonl"
        self.ckpt_dir = run_dir.path / "checkpoints"
        self.start_round, self.grad_steps, self.points, self.wall_offset = 0, 0, 0, 0.0

    # --- resume -------------------------------------------------------------------
    def resume(self) -> bool:
        """Continue from the latest complete checkpoint; drop metrics written after it."""
        tag = latest_checkpoint(self.ckpt_dir)
        if tag is None:  # killed before the round-0 checkpoint: anything logged so far is redone
            self._trim(-1)
            self.log(f"no complete checkpoint in {self.ckpt_dir}; starting from round 0")
            return False
        weights, extra, meta = load_checkpoint(self.ckpt_dir, tag)
        self.trainer.load_global(weights)
        self.trainer.load_state_dict(extra["trainer"])
        self.start_round, self.grad_steps = int(meta["round"]), int(meta["grad_steps"])
        self.points = int(meta.get("points", 0))
        self.wall_offset = float(meta["wall_time_s"])
        self._trim(self.start_round)
        self.log(f"resumed from checkpoint {tag} (round {self.start_round}) in {self.run_dir.path}")
        return True

    def _trim(self, last_round: int) -> None:
        for path in (self.run_dir.metrics_path, self.losses_path):
            if path.exists():
                dropped = trim_metrics(path, last_round)
                if dropped:
                    self.log(f"dropped {dropped} records after round {last_round} from {path.name} "
                             "(written after the checkpoint the run resumes from)")

    # --- the loop -----------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.perf_counter() - self.wall_offset
        losses = MetricsWriter(self.losses_path)
        if self.start_round == 0:
            self._evaluate(0, [], t0)
        window: list[dict] = []
        bar = tqdm(range(self.start_round + 1, self.cfg.rounds + 1), desc=self.trainer.method,
                   unit="round", dynamic_ncols=True, disable=None)
        last_align = None
        for rnd in bar:
            stats = self.trainer.train_round(rnd)
            self.grad_steps += stats["grad_steps"]
            self.points += stats["points"]
            row = {"round": rnd, "train_loss": stats["train_loss"],
                   "train_loss_per_client": stats["train_loss_per_client"], "grad_steps": self.grad_steps,
                   "points": self.points}
            losses.write(row)
            self.wandb.log({"loss/train_mean": stats["train_loss"], "compute/grad_steps": self.grad_steps,
                            "compute/points": self.points}, step=rnd)
            window.append(row)
            if rnd % self.cfg.eval_every == 0 or rnd == self.cfg.rounds:
                rec = self._evaluate(rnd, window, t0)
                last_align, window = rec["eval_alignment_score"], []
            bar.set_postfix(loss=f"{stats['train_loss']:.3f}",
                            align="-" if last_align is None else f"{last_align:.4f}")
        losses.close()
        return self._finish(t0)

    def _evaluate(self, rnd: int, window: list[dict], t0: float) -> dict:
        evals, trains = self.trainer.evaluate(rnd)
        rec = eval_record(rnd, evals, trains, window, self.grad_steps, self.points, time.perf_counter() - t0)
        self.run_dir.log_metrics(rec)
        self.wandb.log(wandb_metrics(rec), step=rnd)
        self._checkpoint(f"round_{rnd:05d}", rnd, rec["wall_time_s"])
        return rec

    def _checkpoint(self, tag: str, rnd: int, wall: float) -> None:
        extra = {"trainer": self.trainer.state_dict(), "torch_rng": torch.get_rng_state()}
        meta = {"round": rnd, "grad_steps": self.grad_steps, "points": self.points, "wall_time_s": wall,
                "method": self.trainer.method}
        weights = {k: v.detach().cpu().contiguous() for k, v in self.trainer.global_state.items()}
        save_checkpoint(self.ckpt_dir, tag, model_state=weights, extra_states=extra, meta=meta)
        if self.cfg.save_client:
            self._save_client_weights(tag)

    def _save_client_weights(self, tag: str) -> None:
        """Each client's locally trained weights of the last round (the released code's --save_client)."""
        folder = self.ckpt_dir / "clients" / tag
        folder.mkdir(parents=True, exist_ok=True)
        for name, state in getattr(self.trainer, "last_client_states", {}).items():
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
            blob = save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()})
            atomic_write_bytes(folder / f"{safe}.safetensors", blob)

    def _finish(self, t0: float) -> dict:
        self.run_dir.close()
        records = read_metrics(self.run_dir.metrics_path)
        losses = read_metrics(self.losses_path)
        wall = time.perf_counter() - t0
        self._checkpoint("final", self.cfg.rounds, wall)
        summary = build_summary(records, losses, self.cfg, wall)
        self.run_dir.write_summary(summary)
        self.wandb.summary({k: v for k, v in summary.items() if not isinstance(v, dict)})
        last = records[-1]
        self.log(format_group_table(last["eval_group_scores"], last["train_group_scores"],
                                    last["eval_cov"], last["eval_fi"], last["train_cov"], last["train_fi"],
                                    title=f"{self.trainer.method}: round {last['round']} "
                                          f"(mean eval alignment {last['eval_alignment_score']:.4f})"))
        return summary


def build_summary(records: list[dict], losses: list[dict], cfg: LoopConfig, wall: float) -> dict:
    final = records[-1]
    best = max(records, key=lambda r: r["eval_alignment_score"])
    conv = None
    if len(losses) >= 2:
        window = min(cfg.convergence_window, len(losses))
        window -= 1 - window % 2  # the centred average needs an odd window
        conv = convergence_round([r["round"] for r in losses], [r["train_loss"] for r in losses],
                                 threshold=cfg.convergence_threshold, smoothing="centred", window=window)
    at_conv = next((r for r in losses if r["round"] == conv), {}) if conv is not None else {}
    return {
        "rounds": final["round"],
        "final_eval_alignment_score": final["eval_alignment_score"],
        "best_eval_alignment_score": best["eval_alignment_score"],
        "best_round": best["round"],
        "final_eval_fi": final["eval_fi"], "final_eval_cov": final["eval_cov"],
        "final_train_alignment_score": final["train_alignment_score"],
        "final_train_fi": final["train_fi"], "final_train_cov": final["train_cov"],
        "final_train_loss": losses[-1]["train_loss"] if losses else None,
        "convergence_round": conv,
        "convergence_grad_steps": at_conv.get("grad_steps"),
        "convergence_points": at_conv.get("points"),
        "convergence": {"threshold": cfg.convergence_threshold, "smoothing": "centred moving average",
                        "window_rounds": cfg.convergence_window},
        "total_grad_steps": final["grad_steps"],
        "total_points": final.get("points"),
        "wall_time_s": round(wall, 3),
        "final_eval_group_scores": final["eval_group_scores"],
    }
