"""The saved benchmark results (benchmarks/results/*.json) and their Markdown table, results.md.
No matplotlib here: benchmarks.bench imports this module into every timed process."""
from __future__ import annotations

import json
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

# (column title, run key or dotted path, multiplier, format)
COLUMNS = [
    ("clients", "clients", 1, "{:d}"),
    ("dim", "dim", 1, "{:d}"),
    ("questions", "questions", 1, "{:d}"),
    ("engine", "engine", None, "{}"),
    ("precision", "precision", None, "{}"),
    ("load s", "load_s", 1, "{:.2f}"),
    ("local step ms", "local_step_s", 1e3, "{:.1f}"),
    ("FedAvg round s", "fedavg_round_s", 1, "{:.3f}"),
    ("eval s", "eval_s", 1, "{:.3f}"),
    ("eval + held-out s", "eval_full_s", 1, "{:.3f}"),
    ("central seq. epoch s", "central_epoch_s.sequential", 1, "{:.3f}"),
    ("central batched epoch s", "central_epoch_s.batched", 1, "{:.3f}"),
    ("peak RSS MB", "peak_rss_mb", 1, "{:.0f}"),
    ("step GFLOP/s", "step_gflops", 1, "{:.1f}"),
    ("step % of peak", "step_fraction_of_peak", 100, "{:.1f}"),
    ("round GFLOP/s", "round_gflops", 1, "{:.1f}"),
    ("projected protocol h", "projected_full_protocol_s", 1 / 3600, "{:.2f}"),
]


def load_results(results_dir: Path) -> list[dict]:
    """Every saved result, oldest scale name first; unreadable files are an error naming the file."""
    out = []
    for path in sorted(results_dir.glob("*.json")):
        try:
            res = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise SystemExit(f"error: cannot read benchmark result {path}: {err}")
        if res.get("benchmark") == "plurallm":
            res["_file"] = path.name
            out.append(res)
    return out


def cell(run: dict, key: str, mult, fmt: str) -> str:
    value = run
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return "–"
    return fmt.format(value * mult if mult not in (None, 1) else value)


def machine_line(m: dict) -> str:
    gpu = f", GPU {m['cuda_device']} ({m.get('gpu_memory_gb')} GB)" if m.get("cuda_device") else ""
    return (f"{m['cpu_model']}, {m['cpu_count']} cores ({m.get('cpu_affinity')} usable), "
            f"{m.get('memory_gb')} GB RAM{gpu}; torch {m['torch']} with {m['torch_threads']} threads, "
            f"device `{m['device']}`; commit {str(m.get('git_commit'))[:10]}{' (dirty)' if m.get('git_dirty') else ''}")


def peak_line(peaks: dict) -> str:
    parts = [f"{k} {v['gflops']:.1f} GFLOP/s ({v['size']}² mm)" if "gflops" in v else f"{k}: {v.get('error')}"
             for k, v in peaks.items()]
    return "matmul peak: " + ", ".join(parts)


def markdown_section(res: dict) -> list[str]:
    lines = [f"## {res['scale']} — {res['machine']['device_name']}", "",
             f"`{' '.join(res['command'])}` ({res['created'][:19]}Z, file `{res['_file']}`)", "",
             machine_line(res["machine"]), "", peak_line(res["matmul_peak"]), "",
             "| " + " | ".join(c[0] for c in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    for run in res["runs"]:
        if "error" in run:
            head = [cell(run, key, mult, fmt) for _, key, mult, fmt in COLUMNS[:5]]
            lines.append("| " + " | ".join(head + [f"failed: {run['error']}"] + [""] * (len(COLUMNS) - 6)) + " |")
            continue
        lines.append("| " + " | ".join(cell(run, key, mult, fmt) for _, key, mult, fmt in COLUMNS) + " |")
    proj = next((r["projection"]["formula"] for r in res["runs"] if r.get("projected_full_protocol_s")), None)
    if proj:
        lines += ["", f"Projection: `{proj}`."]
    return lines + [""]


def write_markdown(results_dir: Path = RESULTS_DIR) -> Path:
    results = load_results(results_dir)
    if not results:
        raise SystemExit(f"error: no benchmark results in {results_dir}; run python -m benchmarks.bench --save first")
    lines = ["# Benchmark results", "",
             "Written by `python -m benchmarks.bench --markdown` from the JSON files beside this one; "
             "what each column means: benchmarks/README.md. FedAvg rounds and centralized epochs are "
             "means (medians in files written before that change), local steps and evaluations "
             "medians; – means not measured at that scale. Each section names the commit it ran; "
             "its GFLOP figures use that commit's FLOP model: files from before commit 5bb6d84 "
             "count the last layer's context rows (computed then, skipped since) and an input "
             "gradient of x·W_x that was never computed, so their GFLOP/s read high.", ""]
    for res in results:
        lines += markdown_section(res)
    out = results_dir / "results.md"
    out.write_text("\n".join(lines))
    return out
