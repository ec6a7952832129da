#!/usr/bin/env bash
# `make train-demo` (after `make demo`): a sample recipe trained as a cluster job, through `ray job submit`
# to a Ray head on this machine, with Ray Train running data-parallel workers over the shards `make demo`
# wrote; then the run folder and its evaluation report.
#
# Knobs (environment): DEMO_DATA (default data/), RECIPE (default sample_tsm), WORKERS (default 2),
# TRAIN_ARGS (extra `key=value` overrides), and the head's knobs in infra/local_head.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=$(cd "${DEMO_DATA:-data}" && pwd)
RECIPE=${RECIPE:-sample_tsm}
[ -f "$DATA/shards/manifest.json" ] || { echo "no shards in $DATA/shards: run \`make demo\` first" >&2; exit 1; }
RUN_DIR="$DATA/runs/$RECIPE-$(date +%Y%m%d-%H%M%S)"
source infra/local_head.sh
start_local_head
wait_for_local_head

read -r -a OVERRIDES <<<"${TRAIN_ARGS:-}"   # split on spaces, no globbing: `key=[a,b]` stays as it is
echo "== submitting $RECIPE on ${WORKERS:-2} Ray Train workers"
ray job submit --address "$RAY_DASHBOARD" --working-dir . --runtime-env-json "$JOB_RUNTIME_ENV" -- \
    python -m train fit --config "configs/$RECIPE.yaml" --workers "${WORKERS:-2}" --run-dir "$RUN_DIR" \
    "data.train.shards=$DATA/shards" "data.val.shards=$DATA/shards" ${OVERRIDES[@]+"${OVERRIDES[@]}"}

echo "== run folder: $RUN_DIR (config, metrics, TensorBoard, checkpoints, curves.png, eval_report.json)"
