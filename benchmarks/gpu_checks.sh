#!/usr/bin/env bash
# The 'On a GPU' checks of benchmarks/README.md as one prepared command for a lent CUDA machine
# (about 6 minutes on an H200). Everything it makes lands in $OUT (default /tmp/gpu_checks):
# env.txt, pytest.log, bench.log and the benchmark JSON named after the GPU. Copy the JSON
# into benchmarks/results/ and run `python -m benchmarks.plot` where the CPU results are.
#
#   bash benchmarks/gpu_checks.sh                       # on the GPU machine
#   DEVICE=cpu PAPER=tiny CLIENTS=tiny PEAK=256 bash benchmarks/gpu_checks.sh   # a dry run of the plumbing
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_checks}"; mkdir -p "$OUT"
PY="${PYTHON:-python3}"; DEVICE="${DEVICE:-cuda}"
PAPER="${PAPER:-paper}"; CLIENTS="${CLIENTS:-clients}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0
{
  date -u +%FT%TZ; uname -a; nvidia-smi 2>&1 | head -15
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
# -rs lists every skip: on a GPU the CUDA tests must run, not skip.
timeout 200 $PY -m pytest -q -rs -p no:cacheprovider tests/test_metrics.py tests/test_model.py tests/test_engines.py \
  2>&1 | tee "$OUT/pytest.log"
echo "pytest exit ${PIPESTATUS[0]}"
run_bench() {  # seconds, then bench flags; the log lines of every point land in bench.log
  local secs=$1; shift
  echo "== bench $*" >> "$OUT/bench.log"
  timeout "$secs" $PY -m benchmarks.bench --device "$DEVICE" ${PEAK:+--peak_size $PEAK} --save --results_dir "$OUT" "$@" \
    2> >(tee -a "$OUT/bench.log" >&2) > /dev/null
  echo "== exit $? (bench $*)" | tee -a "$OUT/bench.log"
}
run_bench 150 --scale "$PAPER" --engines loop
run_bench 200 --scale "$CLIENTS" --engines loop
ls -la "$OUT"
