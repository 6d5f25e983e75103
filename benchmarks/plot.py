"""The figure and table of the saved benchmark results (benchmarks/results/*.json).

    python -m benchmarks.plot                  # results.md and round_time_vs_clients.png
    python -m benchmarks.plot --scales clients,tiny
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib.pyplot as plt

from benchmarks.table import RESULTS_DIR, load_results, write_markdown
from reporting.figures import finish


def round_time_series(results: list[dict], scales: set[str]) -> dict[str, list[tuple[int, float]]]:
    """{line label: [(clients, round seconds)]}, one line per device / engine / precision / dim."""
    series: dict[str, list[tuple[int, float]]] = {}
    for res in results:
        if res["scale"] not in scales:
            continue
        for run in res["runs"]:
            if run.get("fedavg_round_s") is None:
                continue
            label = (f"{res['machine']['device_name']} · {run['engine']} · {run['precision']} · dim {run['dim']}")
            series.setdefault(label, []).append((run["clients"], run["fedavg_round_s"]))
    return {k: sorted(v) for k, v in sorted(series.items())}


def plot_round_time(results_dir: Path = RESULTS_DIR, scales: tuple[str, ...] = ("clients",)) -> Path:
    series = round_time_series(load_results(results_dir), set(scales))
    if not series:
        raise SystemExit(f"error: no FedAvg round times for scale(s) {', '.join(scales)} in {results_dir}; "
                         "run python -m benchmarks.bench --scale clients --save first")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, points in series.items():
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ticks = sorted({x for points in series.values() for x, _ in points})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    return finish(fig, ax, "FedAvg round time against the number of clients", "training clients per round",
                  "FedAvg round time (s)", results_dir / "round_time_vs_clients.png",
                  note="one line per device · engine · precision · embedding dim", legend_size=7)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Plot and tabulate saved benchmark results.")
    p.add_argument("--results_dir", default=str(RESULTS_DIR), help="folder of the benchmark JSON files")
    p.add_argument("--scales", default="clients", help="comma-separated scales whose round times are plotted")
    opts = p.parse_args(argv)
    results_dir = Path(opts.results_dir)
    print(f"wrote {write_markdown(results_dir)}")
    print(f"wrote {plot_round_time(results_dir, tuple(opts.scales.split(',')))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
