#!/usr/bin/env bash
# The long experiments of issue 21, in order, resumable across jobs that each end after a few hours:
#
#   bash scripts/queue.sh            start (or continue) the queue in the background; returns at once
#   bash scripts/queue.sh --status   what is finished, diverged or missing against results/
#
# The queue runs from a git worktree of the current commit (./.queue_worktree, never edited), so
# edits in this tree cannot reach a running experiment; its records go to this tree's results/
# and each is committed the moment it is written (that path only). Finished runs are reused after
# a 2-round replay, so a new job simply starts the queue again. Log: ./queue.log.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PY="${PYTHON:-python}"
export FLWR_TELEMETRY_ENABLED=0 RAY_USAGE_STATS_ENABLED=0 WANDB_MODE=disabled
# The worktree has no ../shared beside it: the data is found from this checkout's.
export PLURALLLM_OPINIONQA_DIR="${PLURALLLM_OPINIONQA_DIR:-$ROOT/../shared/data/opinionqa}"
export PLURALLLM_GLOBALQA_CSV="${PLURALLLM_GLOBALQA_CSV:-$ROOT/../shared/data/globalopinionqa_sample/global_opinions_sample.csv}"
GQA_BOUNDS=(--dataset globalqa --min_ctx_num_qs 5 --min_tar_num_qs 6 --eval_num_qs 9)
CODE_FLAGS=(--methods fedavg centralized --seeds 0 1 --loss_reduction slot_mean --layer_init clones
            --episode_bounds code --weighting episode_points --central_mode batched --name opinionqa_paper_code)
STEPS=(
  "scripts/reproduce.py --preset paper_unseen"
  "scripts/sweep.py --preset group_use"
  "scripts/sweep.py --preset group_factors"
  "scripts/reproduce.py --preset paper"
  "scripts/sweep.py --preset privacy"
  "scripts/sweep.py --preset strategies"
  "scripts/reproduce.py --preset paper ${GQA_BOUNDS[*]}"
  "scripts/reproduce.py --preset paper ${CODE_FLAGS[*]}"
)

if [[ "${1:-}" == "--status" ]]; then
  for step in "${STEPS[@]}"; do
    echo "== $step"
    $PY $step --records_dir "$ROOT/results" --status || true
  done
  exit 0
fi

WT="$ROOT/.queue_worktree"
if [[ ! -d "$WT" ]]; then
  git worktree add --detach "$WT" HEAD >/dev/null
fi
echo "queue: worktree $WT at $(git -C "$WT" rev-parse --short HEAD); log $ROOT/queue.log"
(
  cd "$WT"
  for step in "${STEPS[@]}"; do
    echo "== $(date -u +%FT%TZ) $step"
    PYTHONPATH="$WT" $PY $step --records_dir "$ROOT/results" --commit_records || echo "step failed: $step"
  done
  echo "== $(date -u +%FT%TZ) queue done"
) >> "$ROOT/queue.log" 2>&1 < /dev/null &
disown
