"""Time what users run: data loading, a local step, a FedAvg round, evaluation, a centralized epoch.

Each scale point (and engine) goes through main_fl.py's flags, data loading and trainers in a fresh
subprocess (`--one-scale`), so its peak RSS is its own. Commands and numbers: benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from benchmarks.table import RESULTS_DIR, write_markdown
from data_loaders.synthetic import group_names
from models.flops import train_flops
from orchestration.cli import build_parser as run_parser
from orchestration.experiment import check_flags, load_data, make_trainer, validate
from utils.device import resolve_device
from utils.errors import exit_on_error
from utils.provenance import environment_info
from utils.seeding import seed_everything

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASURES = ("step", "round", "eval", "central")


# --- scales -------------------------------------------------------------------------

def _override(default: int, help: str):
    """A preset field that a flag of the same name overrides (`help`: the flag's help)."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Scale:
    clients: tuple[int, ...]      # training clients, one benchmark point each
    eval_clients: int = _override(6, "held-out evaluation groups")
    questions: int = _override(800, "questions per group (every group answers every question)")
    min_options: int = _override(2, "fewest options per question")
    max_options: int = _override(7, "most options per question")
    dim: int = _override(4096, "embedding dimension")
    epochs: int = _override(6, "local steps per client per round")
    rounds: int = _override(3, "timed FedAvg rounds (+1 warm-up)")
    central_epochs: int = _override(24, "timed centralized epochs per mode (+1 warm-up)")
    repeats: int = _override(3, "timed local-step fits and evaluations (+1 warm-up)")
    measure: tuple[str, ...] = MEASURES


OVERRIDES = {f.name: f.metadata["help"] for f in dataclasses.fields(Scale) if f.metadata}


SCALES: dict[str, Scale] = {
    # GlobalOpinionQA as in the paper: 14 countries (8 train / 6 eval), Alpaca-7B embeddings.
    "paper": Scale(clients=(8,), dim=4096, rounds=5),
    "minilm": Scale(clients=(8,), dim=384, rounds=5),
    # 225 questions: a client's local 90% is 202 questions, more than the largest episode
    # (max_ctx + max_tar = 200), so episodes, hence step cost, are drawn exactly as at
    # 800 questions, while 518 groups stay ≈ 1.6 GB (two fp32 copies of 225·4.5·384 per group).
    "clients": Scale(clients=(8, 32, 128, 512), questions=225, dim=384, rounds=2, measure=("step", "round")),
    # For tests and smoke runs: seconds on a laptop.
    "tiny": Scale(clients=(2,), eval_clients=2, questions=50, dim=32, rounds=1, central_epochs=2, repeats=1),
}


def cli_argv(point: dict) -> list[str]:
    """The main_fl.py flags of one benchmark point: synthetic data, explicit group lists."""
    n_train, n_eval = point["clients"], point["eval_clients"]
    names = group_names(n_train + n_eval)
    argv = ["--dataset", "synthetic", "--syn_groups", str(n_train + n_eval),
            "--syn_questions", str(point["questions"]), "--syn_min_options", str(point["min_options"]),
            "--syn_max_options", str(point["max_options"]), "--syn_dim", str(point["dim"]),
            "--train_groups", ",".join(names[:n_train]), "--eval_groups", ",".join(names[n_train:]),
            "--epochs", str(point["epochs"]), "--device", point["device"], "--wandb", "off", "--quiet"]
    argv += ["--client_engine", point["engine"]] if "engine" in point else []  # benchmarks.ab passes none
    return argv + shlex.split(point.get("cli_args", ""))


# --- timing -------------------------------------------------------------------------

def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t0


def repeat_timed(fn: Callable[[int], Any], n: int, device: torch.device) -> list[tuple[Any, float]]:
    """Call fn(i) for i = 1 .. n+1; the first call warms up and is dropped."""
    return [timed(lambda i=i: fn(i), device) for i in range(1, n + 2)][1:]


def median_s(runs: list[tuple[Any, float]]) -> float:
    return statistics.median(s for _, s in runs)


def matmul_peak(size: int, device: torch.device, min_time: float = 0.5, min_reps: int = 3,
                max_reps: int = 1000) -> dict:
    """This machine's achieved fp32 GFLOP/s on a size×size torch.mm: best and median of repeats."""
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(size, size, generator=gen).to(device) for _ in range(2))
    timed(lambda: torch.mm(a, b), device)  # warm-up: kernel selection, allocation
    times: list[float] = []
    while len(times) < max_reps and (len(times) < min_reps or sum(times) < min_time):
        times.append(timed(lambda: torch.mm(a, b), device)[1])
    flop = 2 * size ** 3
    return {"size": size, "dtype": "float32", "reps": len(times),
            "gflops": flop / min(times) / 1e9, "median_gflops": flop / statistics.median(times) / 1e9}


def peak_rss_mb() -> float:
    scale = 1 / 2 ** 20 if sys.platform == "darwin" else 1 / 2 ** 10  # ru_maxrss: KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


# --- machine ------------------------------------------------------------------------

def machine_info(device: torch.device) -> dict:
    env = environment_info()
    info = {**{k: env.get(k) for k in ("cpu_model", "cpu_count", "python", "platform", "cuda", "git_commit",
                                       "git_dirty")},
            "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1),  # MemTotal
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
            "device_name": env.get("cpu_model"), "cuda_device": None,
            "float32_matmul_precision": torch.get_float32_matmul_precision()}
    if device.type == "cuda":
        info["cuda_device"] = info["device_name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 1)
    return info


def device_slug(info: dict) -> str:
    return re.sub(r"[^a-z0-9]+", "-", info["cuda_device"].lower()).strip("-") if info["cuda_device"] else "cpu"


# --- one scale point (child process) ------------------------------------------------

def measure_local_step(trainer, model_cfg, epochs: int, repeats: int, device) -> dict:
    """Local steps of one client on the loop path: GroupClient.fit time / epochs."""
    _, client = min(trainer.clients.items())
    base = 10_000  # rounds the FedAvg timing never reaches, so its episodes stay untouched
    runs = repeat_timed(lambda r: client.fit(trainer.model, trainer.global_state, base + r), repeats, device)
    eps = [client.round_episodes(base + r) for r in range(2, repeats + 2)]
    flops = [sum(train_flops(model_cfg, c, t) for c, t in e) for e in eps]
    secs = [s for _, s in runs]
    points = [p for e in eps for p in e]
    return {"local_step_s": statistics.median(s / epochs for s in secs),
            "local_step_samples_s": [s / epochs for s in secs],
            "gflop_per_step": sum(flops) / len(points) / 1e9, "step_gflops": sum(flops) / sum(secs) / 1e9,
            "mean_ctx_points": sum(c for c, _ in points) / len(points),
            "mean_tgt_points": sum(t for _, t in points) / len(points)}


def measure_rounds(trainer, model_cfg, rounds: int, device) -> dict:
    runs = repeat_timed(trainer.train_round, rounds, device)
    flops = [sum(train_flops(model_cfg, c, t) for n in stats["clients"]
                 for c, t in trainer.clients[n].round_episodes(r)) for r, (stats, _) in enumerate(runs, start=2)]
    secs = [s for _, s in runs]
    return {"fedavg_round_s": statistics.mean(secs), "fedavg_round_median_s": statistics.median(secs),
            "fedavg_round_samples_s": secs,
            "gflop_per_round": sum(flops) / len(flops) / 1e9, "round_gflops": sum(flops) / sum(secs) / 1e9}


def measure_eval(trainer, repeats: int, device) -> dict:
    """Evaluation groups only (what the eval alignment needs), and the full evaluate (+ train held-out)."""
    groups = repeat_timed(lambda r: {n: c.evaluate(trainer.model, trainer.global_state, r)
                                     for n, c in trainer.eval_clients.items()}, repeats, device)
    full = repeat_timed(trainer.evaluate, repeats, device)
    return {"eval_s": median_s(groups), "eval_full_s": median_s(full)}


def measure_central(run, data, rounds: int, repeats: int, device) -> dict:
    out: dict[str, Any] = {"central_epoch_s": {}}
    for mode in ("sequential", "batched"):
        trainer = make_trainer(replace(run, method="centralized",
                                       federation=replace(run.federation, central_mode=mode)), data, device)
        # mean: episode sizes vary from epoch to epoch, and the protocol pays their sum
        out["central_epoch_s"][mode] = statistics.mean(s for _, s in repeat_timed(trainer.train_round, rounds, device))
        if mode == "sequential":
            out["central_eval_full_s"] = median_s(repeat_timed(trainer.evaluate, repeats, device))
        del trainer
        free(device)
    return out


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def num_evaluations(rounds: int, every: int) -> int:
    """Evaluations of the run loop: round 0, every `every` rounds, and the last round."""
    every = max(1, every)
    return 1 + rounds // every + (1 if rounds % every else 0)


def projection(rec: dict, args) -> dict:
    """Seconds of the whole protocol (both methods, all evaluations), or the missing inputs."""
    n_fed = num_evaluations(args.comm_round, args.federated_eval)
    n_cen = num_evaluations(args.central_epochs, args.eval_freq)
    terms = {"load_s": (1, rec.get("load_s")),
             "fedavg_round_s": (args.comm_round, rec.get("fedavg_round_s")),
             "central_epoch_s.sequential": (args.central_epochs, rec.get("central_epoch_s", {}).get("sequential")),
             "eval_full_s": (n_fed, rec.get("eval_full_s")),
             "central_eval_full_s": (n_cen, rec.get("central_eval_full_s"))}
    formula = " + ".join(f"{k} × {n}" if n != 1 else k for k, (n, _) in terms.items())
    missing = [k for k, (_, v) in terms.items() if v is None]
    total = None if missing else sum(n * v for n, v in terms.values())
    return {"formula": f"projected_full_protocol_s = {formula}", "missing": missing,
            "terms": {k: {"count": n, "seconds": v} for k, (n, v) in terms.items()}, "total_s": total}


def run_point(point: dict) -> dict:
    if point.get("threads"):
        torch.set_num_threads(point["threads"])
    args = run_parser("fedavg").parse_args(cli_argv(point))
    run = check_flags(args)
    device = resolve_device(run.federation.device)
    (data, load_s) = timed(lambda: load_data(run, log=log), device)
    validate(run, data)
    model_cfg = run.model_for(data.dim_x)
    seed_everything(args.seed)
    rec: dict[str, Any] = {**point, "model": model_cfg.to_dict(), "torch_threads": torch.get_num_threads(),
                           "load_s": load_s}
    measure = set(point["measure"])
    if measure & {"step", "round", "eval"}:
        trainer = make_trainer(run, data, device)
        rec["engine_requested"], rec["engine"] = point["engine"], trainer.client_engine  # `auto` resolves per machine
        if "step" in measure:
            stage(rec, "local steps", lambda: measure_local_step(trainer, model_cfg, run.client.epochs,
                                                                 point["repeats"], device))
        if "round" in measure:
            stage(rec, "fedavg rounds", lambda: measure_rounds(trainer, model_cfg, point["rounds"], device))
        if "eval" in measure:
            stage(rec, "evaluation", lambda: measure_eval(trainer, point["repeats"], device))
        del trainer
        free(device)
    if "central" in measure:
        stage(rec, "centralized epochs", lambda: measure_central(run, data, point["central_epochs"],
                                                                 point["repeats"], device))
    proj = projection(rec, args)
    rec["projected_full_protocol_s"], rec["projection"] = proj["total_s"], proj
    rec["peak_rss_mb"] = peak_rss_mb()
    if device.type == "cuda":
        rec["peak_gpu_mb"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return rec


# --- driver -------------------------------------------------------------------------

def add_peak_fractions(rec: dict, peak: dict) -> None:
    """Achieved / measured fp32 matmul peak."""
    for key in ("step_gflops", "round_gflops"):
        if rec.get(key) is not None:
            rec[key.replace("gflops", "fraction_of_peak")] = rec[key] / peak["gflops"]


def run_child(point: dict) -> dict:
    """One point in a fresh interpreter; its log streams to our stderr, its JSON comes back on stdout."""
    cmd = [sys.executable, "-m", "benchmarks.bench", "--one-scale", json.dumps(point)]
    last = ""
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
        for line in proc.stderr:
            sys.stderr.write(line)
            last = line.strip() or last
        rc = proc.wait()
        out.seek(0)
        lines = out.read().strip().splitlines()
    if rc != 0 or not lines:
        return {**point, "error": f"exit status {rc}: {last}"}
    return json.loads(lines[-1])


def variants(parser: argparse.ArgumentParser, flag: str, requested: str | None) -> list[str]:
    """The values of --engines (default: main_fl.py's default), checked against the flag's choices."""
    action = next(a for a in parser._actions if flag in a.option_strings)
    values = requested.split(",") if requested else [action.default]
    bad = [v for v in values if v not in action.choices]
    if bad:
        raise SystemExit(f"error: {flag} {bad[0]!r} is not one of {', '.join(action.choices)}")
    return values


def scale_points(opts: argparse.Namespace) -> list[dict]:
    sc = SCALES[opts.scale]
    over = {k: getattr(opts, k) for k in OVERRIDES if getattr(opts, k) is not None}
    if opts.clients:
        over["clients"] = tuple(int(c) for c in opts.clients.split(","))
    if opts.measure:
        unknown = set(opts.measure.split(",")) - set(MEASURES)
        if unknown:
            raise SystemExit(f"error: --measure {sorted(unknown)}: choose from {', '.join(MEASURES)}")
        over["measure"] = tuple(opts.measure.split(","))
    sc = dataclasses.replace(sc, **over)
    engines = variants(run_parser("fedavg"), "--client_engine", opts.engines)
    base = {k: v for k, v in dataclasses.asdict(sc).items() if k != "clients"}
    # fp32 is the model's only precision since bf16 was retired; older result files also hold bf16 runs
    return [{"scale": opts.scale, **base, "clients": n, "engine": e, "precision": "fp32", "device": opts.device,
             "threads": opts.threads, "cli_args": opts.cli_args} for n in sc.clients for e in engines]


def run_driver(opts: argparse.Namespace, argv: list[str]) -> int:
    points = scale_points(opts)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    device = resolve_device(opts.device)
    machine = machine_info(device)
    size = opts.peak_size or (8192 if device.type == "cuda" else 2048)
    peak = matmul_peak(size, device)
    log(f"matmul peak: fp32 {peak['gflops']:.1f} GFLOP/s")
    runs = []
    for point in points:
        log(f"point: {point['clients']} clients, dim {point['dim']}, engine {point['engine']}")
        rec = run_child(point)
        add_peak_fractions(rec, peak)
        runs.append(rec)
        log(summary_line(rec))
    result = {"benchmark": "plurallm", "scale": opts.scale, "created": datetime.now(timezone.utc).isoformat(),
              "command": ["python", "-m", "benchmarks.bench", *argv], "machine": machine,
              "matmul_peak": {"fp32": peak}, "runs": runs}
    tag = f"_{opts.tag}" if opts.tag else ""
    emit(result, Path(opts.results_dir) / f"{opts.scale}{tag}_{device_slug(machine)}.json" if opts.save else None)
    return 1 if any("error" in r for r in runs) else 0


def emit(result: dict, path: Path | None) -> None:
    text = json.dumps(result, indent=2, allow_nan=False)
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
        log(f"saved {path}")


def summary_line(rec: dict) -> str:
    if "error" in rec:
        return f"  failed: {rec['error']}"
    keys = ("load_s", "local_step_s", "fedavg_round_s", "eval_s", "eval_full_s", "projected_full_protocol_s")
    parts = [f"{k} {rec[k]:.4g}" for k in keys if rec.get(k) is not None]
    return "  " + ", ".join(parts + [f"peak_rss_mb {rec['peak_rss_mb']:.0f}"])


def stage(rec: dict, name: str, measure: Callable[[], dict]) -> None:
    """Run one measurement into rec, logging its wall time and timings as it ends: a point cut off
    by a time limit still shows which stages finished and what they cost."""
    log(name)
    start = time.perf_counter()
    out = measure()
    rec.update(out)
    timings = [f"{k} {v:.4g}" for k, v in out.items() if k.endswith("_s") and isinstance(v, float)]
    log(f"  {name} done in {time.perf_counter() - start:.1f} s" + (": " + ", ".join(timings) if timings else ""))


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Benchmark the PluralLLM training code on synthetic data.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scale", default="minilm", choices=sorted(SCALES), help="named preset (benchmarks/README.md)")
    p.add_argument("--clients", default=None, help="comma-separated training-client counts (overrides the preset)")
    for name, what in OVERRIDES.items():
        p.add_argument(f"--{name}", type=int, default=None, help=what)
    p.add_argument("--measure", default=None, help=f"comma-separated subset of {','.join(MEASURES)}")
    p.add_argument("--engines", default=None, help="comma-separated --client_engine values (default: its default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--peak_size", type=int, default=0, help="matmul size for the peak (0: 2048 on CPU, 8192 on CUDA)")
    p.add_argument("--cli_args", default="", help="more main_fl.py flags, e.g. \"--eval_batch_size 200\"")
    p.add_argument("--save", action="store_true", help="write <results_dir>/<scale>[_<tag>]_<device>.json")
    p.add_argument("--tag", default="", help="extra name part for --save, to keep several runs of one scale")
    p.add_argument("--results_dir", default=str(RESULTS_DIR), help="where --save and --markdown read and write")
    p.add_argument("--markdown", action="store_true", help="only write <results_dir>/results.md from the saved JSON")
    p.add_argument("--one-scale", dest="one_scale", default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    opts = build_parser().parse_args(argv)
    if opts.one_scale is not None:  # a child of the driver: one scale, one JSON line
        return exit_on_error(lambda: print(json.dumps(run_point(json.loads(opts.one_scale)), allow_nan=False)))
    if opts.markdown:
        log(f"wrote {write_markdown(Path(opts.results_dir))}")
        return 0
    return run_driver(opts, argv)


if __name__ == "__main__":
    sys.exit(main())
