"""Golden runs for the redesign (issue 25): short runs whose logs the refactored code must reproduce.

    python scripts/golden.py --write                  # record tests/golden/ on this machine
    python scripts/golden.py --check                  # rerun every case and compare with tests/golden/
    python scripts/golden.py --check dp alie_trimmed  # some cases only

Each case is one main_fl.py or main_centralized.py run (a few rounds, a small model) trained in
this process with one torch thread and the loop client engine unless the case names another.
Its metrics.jsonl and losses.jsonl are kept without their wall-clock field (`wall_time_s`), one
JSON object per line with sorted keys. On the machine that recorded them (same CPU model and
torch version, MACHINE.json) a rerun must give the same lines byte for byte; elsewhere every
number must agree within the tolerance of the run records' replay check (orchestration/replay.py:
1e-5 relative on the recording CPU model, 1e-3 on another, near-zero values compared absolutely),
and the largest difference is reported. tests/test_golden.py runs the comparison for every case
within that tolerance even on a machine of the same name (hosts that both say "AMD EPYC" can
differ in the last bits); --check by hand is exact there.
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

from orchestration.entry import main as train_main  # noqa: E402
from orchestration.replay import relative_difference, tolerance_for  # noqa: E402  (the records' replay check)
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
    out = []
    for line in path.read_text().splitlines():
        rec = {k: v for k, v in json.loads(line).items() if k not in TIME_KEYS}
        out.append(json.dumps(rec, sort_keys=True))
    return out


def run_case(name: str, work: Path) -> dict[str, list[str]]:
    """Train the case into work/<name> with one torch thread; its logs as canonical lines."""
    import torch

    method, argv = case_argv(name, work / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = train_main(method, argv)
    finally:
        torch.set_num_threads(threads)
    if rc != 0:
        raise RuntimeError(f"golden case {name}: {method} exited {rc} ({' '.join(argv)})")
    return {log: canonical_lines(work / name / log) for log in LOGS}


def machine() -> dict:
    import torch

    return {"cpu_model": cpu_model(), "torch": torch.__version__, "torch_threads": 1}


def _differences(got, want, where: str, out: list[tuple[float, str]]) -> None:
    """Every disagreement between two decoded JSON values: (relative difference, where)."""
    if isinstance(want, dict) and isinstance(got, dict):
        for k in sorted(set(want) | set(got)):
            if k not in want or k not in got:
                out.append((math.inf, f"{where}.{k}: only in {'the rerun' if k in got else 'the golden log'}"))
            else:
                _differences(got[k], want[k], f"{where}.{k}", out)
    elif isinstance(want, list) and isinstance(got, list):
        if len(want) != len(got):
            out.append((math.inf, f"{where}: {len(got)} items, golden {len(want)}"))
        for i, (g, w) in enumerate(zip(got, want)):
            _differences(g, w, f"{where}[{i}]", out)
    elif isinstance(want, float) or isinstance(got, float):
        if not (isinstance(got, (int, float)) and isinstance(want, (int, float))):
            out.append((math.inf, f"{where}: {got!r}, golden {want!r}"))
        elif got != want and not (math.isnan(got) and math.isnan(want)):
            rel = relative_difference(got, want)
            out.append((rel, f"{where}: {got!r}, golden {want!r} (relative {rel:.2e})"))
    elif got != want:
        out.append((math.inf, f"{where}: {got!r}, golden {want!r}"))


def compare(name: str, got: dict[str, list[str]], golden_dir: Path = GOLDEN_DIR,
            here: dict | None = None, strict: bool = True) -> tuple[bool, str]:
    """(passed, one line of explanation). Exact on the recording machine, else within the replay
    tolerance for this CPU model against the recording one.

    strict=False accepts that tolerance on the recording machine too: two hosts can both report
    only "AMD EPYC" and still differ in the last bits (README, Sample output)."""
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
            _differences(json.loads(g), json.loads(w), f"{log} line {i + 1}", diffs)
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


def write(names: list[str], golden_dir: Path = GOLDEN_DIR) -> None:
    golden_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="golden-") as tmp:
        for name in names:
            logs = run_case(name, Path(tmp))
            (golden_dir / name).mkdir(exist_ok=True)
            for log, lines in logs.items():
                (golden_dir / name / log).write_text("\n".join(lines) + "\n")
            print(f"wrote {name}: " + ", ".join(f"{log} {len(v)} lines" for log, v in logs.items()), flush=True)
    (golden_dir / "MACHINE.json").write_text(json.dumps(machine(), indent=2, sort_keys=True) + "\n")


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
    if opts.write:
        write(names)
        return 0
    return check(names)


if __name__ == "__main__":
    sys.exit(main())
