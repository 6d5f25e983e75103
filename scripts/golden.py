"""Golden runs for the redesign (issue 25): short runs whose logs the refactored code must reproduce.

    python scripts/golden.py --write                  # record tests/golden/ on this machine
    python scripts/golden.py --check                  # rerun every case and compare with tests/golden/
    python scripts/golden.py --check dp alie_trimmed  # some cases only

Each case is one main_fl.py or main_centralized.py run of a few rounds, trained here with one torch
thread. Its metrics.jsonl and losses.jsonl, wall clock aside, must be byte for byte the recorded ones on
the recording machine (MACHINE.json), elsewhere within the run records' replay tolerance
(orchestration/replay.py). tests/test_golden.py accepts that tolerance everywhere (README: Design).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from orchestration.entry import main as train_main  # noqa: E402
from orchestration.replay import relative_difference, tolerance_for, torch_threads  # noqa: E402
from reporting.paths import default_data_path  # noqa: E402
from utils.provenance import cpu_model  # noqa: E402

GOLDEN_DIR = ROOT / "tests" / "golden"
TIME_KEYS = frozenset({"wall_time_s"})

# 10 planted groups (6 train, 4 eval), 40 questions, a 2-layer model: seconds per run.
SYNTHETIC = ["--dataset", "synthetic", "--syn_groups", "10", "--syn_questions", "40", "--syn_dim", "16",
             "--d_model", "16", "--dim_feedforward", "16", "--num_layers", "2", "--min_ctx_num_qs", "3",
             "--max_ctx_num_qs", "12", "--min_tar_num_qs", "3", "--max_tar_num_qs", "12", "--eval_num_qs", "5",
             "--wandb", "off", "--quiet", "--no_plots"]
FL = [*SYNTHETIC, "--epochs", "2", "--comm_round", "3", "--federated_eval", "1", "--client_engine", "loop"]
CENTRAL = [*SYNTHETIC, "--central_epochs", "3", "--eval_freq", "1"]
# OpinionQA with MiniLM (cached embeddings), the default seeded split, the same small model.
OPINIONQA = ["--dataset", "opinionqa", "--emb_model", "minilm", "--d_model", "16", "--dim_feedforward", "16",
             "--num_layers", "2", "--max_ctx_num_qs", "20", "--max_tar_num_qs", "20",
             "--wandb", "off", "--quiet", "--no_plots"]
RELEASED_CODE = ["--loss_reduction", "slot_mean", "--layer_init", "clones", "--episode_bounds", "code"]
TRIM = ["--strategy", "trimmed_mean", "--trim_fraction", "0.2"]

# name -> (method, flags)
CASES: dict[str, tuple[str, list[str]]] = {
    "fedavg": ("fedavg", FL),
    "fedavg_threads": ("fedavg", [*FL, "--client_engine", "threads", "--client_workers", "2"]),
    "fedavg_sampled": ("fedavg", [*FL, "--client_fraction", "0.5", "--weighting", "uniform"]),
    "centralized": ("centralized", CENTRAL),
    "centralized_batched": ("centralized", [*CENTRAL, "--central_mode", "batched"]),
    "centralized_matched": ("centralized", [*CENTRAL, "--central_steps", "2"]),
    "fedprox": ("fedavg", [*FL, "--strategy", "fedprox", "--proximal_mu", "0.01"]),
    "qfedavg": ("fedavg", [*FL, "--strategy", "qfedavg", "--qffl_q", "0.1"]),
    "adaptive": ("fedavg", [*FL, "--strategy", "adaptive", "--adaptive_temperature", "0.1"]),
    "trimmed_mean": ("fedavg", [*FL, *TRIM]),
    "median": ("fedavg", [*FL, "--strategy", "median"]),
    "fedadam": ("fedavg", [*FL, "--server_opt", "adam"]),
    "dp": ("fedavg", [*FL, "--weighting", "uniform", "--dp", "--dp_clip", "0.1", "--dp_noise", "1"]),
    "sign_flip_median": ("fedavg", [*FL, "--strategy", "median", "--byzantine", "1", "--attack", "sign_flip",
                                    "--attack_scale", "10"]),
    "alie_trimmed": ("fedavg", [*FL, *TRIM, "--byzantine", "2", "--attack", "alie"]),
    "report_score_adaptive": ("fedavg", [*FL, "--strategy", "adaptive", "--byzantine", "1", "--attack",
                                         "report_score", "--attack_report", "0"]),
    "question_split": ("fedavg", [*FL, "--question_split", "0.25"]),
    "product": ("fedavg", [*FL, "--context_answer", "product"]),
    "released_code": ("fedavg", [*FL, *RELEASED_CODE, "--weighting", "episode_points"]),
    "released_code_centralized": ("centralized", [*CENTRAL, *RELEASED_CODE, "--central_mode", "batched"]),
    "flower_simulation": ("fedavg", [*FL, "--engine", "flower", "--sim_backend", "thread"]),
    "opinionqa_fedavg": ("fedavg", [*OPINIONQA, "--epochs", "2", "--comm_round", "2", "--federated_eval", "1",
                                    "--client_engine", "loop"]),
    "opinionqa_centralized": ("centralized", [*OPINIONQA, "--central_epochs", "2", "--eval_freq", "1"]),
}
LOGS = ("metrics.jsonl", "losses.jsonl")


def needs(name: str) -> str | None:
    """What a case needs beyond the package: 'opinionqa' (the shared data), 'flwr', or None."""
    flags = CASES[name][1]
    if "opinionqa" in flags:
        return "opinionqa"
    return "flwr" if "flower" in flags else None


def case_argv(name: str, out_dir: Path) -> tuple[str, list[str]]:
    method, flags = CASES[name]
    argv = [*flags, "--out_dir", str(out_dir)]
    if "opinionqa" in flags:
        path = default_data_path("opinionqa")
        if path:
            argv += ["--data_path", path]
    return method, argv


def canonical_lines(path: Path) -> list[str]:
    """A JSONL log as sorted-key lines without its wall-clock fields (floats keep their exact repr)."""
    return [json.dumps({k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}, sort_keys=True)
            for line in path.read_text().splitlines()]


def run_case(name: str, work: Path) -> dict[str, list[str]]:
    """Train the case into work/<name> with one torch thread; its logs as canonical lines."""
    method, argv = case_argv(name, work / name)
    with torch_threads(1):
        rc = train_main(method, argv)
    if rc != 0:
        raise RuntimeError(f"golden case {name}: {method} exited {rc} ({' '.join(argv)})")
    return {log: canonical_lines(work / name / log) for log in LOGS}


def machine() -> dict:
    return {"cpu_model": cpu_model(), "torch": torch.__version__, "torch_threads": 1}


def _leaves(value, where: str) -> dict:
    """Every number, string, null or empty container in a decoded JSON value, by its path ('x.y[0]')."""
    if isinstance(value, dict) and value:
        return {k: v for key, item in value.items() for k, v in _leaves(item, f"{where}.{key}").items()}
    if isinstance(value, list) and value:
        return {k: v for i, item in enumerate(value) for k, v in _leaves(item, f"{where}[{i}]").items()}
    return {where: value}


def _differences(got, want, where: str) -> list[tuple[float, str]]:
    """(relative difference, where) of every disagreement; floats within their relative difference."""
    got, want = _leaves(got, where), _leaves(want, where)
    out = []
    for path in [*want, *(p for p in got if p not in want)]:
        if path not in want or path not in got:
            out.append((math.inf, f"{path}: only in {'the rerun' if path in got else 'the golden log'}"))
            continue
        g, w = got[path], want[path]
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (g, w))
        rel = relative_difference(g, w) if numbers and float in (type(g), type(w)) else (0.0 if g == w else math.inf)
        if rel:
            out.append((rel, f"{path}: {g!r}, golden {w!r}" + (f" (relative {rel:.2e})" if rel < math.inf else "")))
    return out


def compare(name: str, got: dict[str, list[str]], golden_dir: Path = GOLDEN_DIR,
            here: dict | None = None, strict: bool = True) -> tuple[bool, str]:
    """(passed, one line of explanation). Exact on the recording machine, else within the replay
    tolerance; strict=False accepts that tolerance there too (two "AMD EPYC" hosts can differ in the last bits)."""
    recorded = json.loads((golden_dir / "MACHINE.json").read_text())
    here = here or machine()
    exact = recorded == here and strict
    diffs: list[tuple[float, str]] = []
    for log in LOGS:
        want = (golden_dir / name / log).read_text().splitlines()
        if exact and got[log] == want:
            continue
        if len(got[log]) != len(want):
            diffs.append((math.inf, f"{log}: {len(got[log])} lines, golden {len(want)}"))
        for i, (g, w) in enumerate(zip(got[log], want)):
            diffs += _differences(json.loads(g), json.loads(w), f"{log} line {i + 1}")
    if not diffs:
        return True, f"{name}: identical" + ("" if recorded == here else " (on another machine)")
    worst = max(diffs)
    if exact:
        return False, f"{name}: {len(diffs)} value(s) differ on the recording machine; first: {diffs[0][1]}"
    tolerance = tolerance_for(recorded["cpu_model"], here["cpu_model"])
    ok = worst[0] <= tolerance
    return ok, (f"{name}: largest relative difference {worst[0]:.2e} ({'within' if ok else 'beyond'} {tolerance:g}; "
                f"recorded on {recorded['cpu_model']}, torch {recorded['torch']}; here {here['cpu_model']}, "
                f"torch {here['torch']}): {worst[1]}")


def write(names: list[str], golden_dir: Path = GOLDEN_DIR) -> int:
    golden_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        for name in names:
            logs = run_case(name, Path(tmp))
            (golden_dir / name).mkdir(exist_ok=True)
            for log, lines in logs.items():
                (golden_dir / name / log).write_text("\n".join(lines) + "\n")
            print(f"wrote {name}: " + ", ".join(f"{log} {len(v)} lines" for log, v in logs.items()), flush=True)
    (golden_dir / "MACHINE.json").write_text(json.dumps(machine(), indent=2, sort_keys=True) + "\n")
    return 0


def check(names: list[str]) -> int:
    failed = 0
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        for name in names:
            ok, line = compare(name, run_case(name, Path(tmp)))
            failed += not ok
            print(("ok      " if ok else "FAILED  ") + line, flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Record or check the golden runs of the redesign (tests/golden/).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="record the cases on this machine")
    mode.add_argument("--check", action="store_true", help="rerun the cases and compare with tests/golden/")
    p.add_argument("cases", nargs="*", help=f"cases (default all): {', '.join(CASES)}")
    opts = p.parse_args(argv)
    unknown = [c for c in opts.cases if c not in CASES]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    names = opts.cases or list(CASES)
    return write(names) if opts.write else check(names)


if __name__ == "__main__":
    sys.exit(main())
