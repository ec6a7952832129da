#!/usr/bin/env bash
# `make demo`: shard the embedded sample dataset the way a real job runs, through `ray job submit` to a
# Ray head on this machine, then say where the shards are and what failed.
#
# Knobs (environment): DEMO_DATA (default data/), SAMPLE_ARGS (extra arguments for the sample generator),
# SHARD_ARGS (extra job arguments), and the head's knobs in infra/local_head.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=$(mkdir -p "${DEMO_DATA:-data}" && cd "${DEMO_DATA:-data}" && pwd)   # the job needs absolute paths
source infra/local_head.sh
start_local_head

echo "== generating the sample dataset in $DATA/sample"
rm -rf "$DATA/sample"
# shellcheck disable=SC2086
$PYTHON -m shards.sample_dataset "$DATA/sample" ${SAMPLE_ARGS:-}

wait_for_local_head
echo "== submitting the shard job"
# shellcheck disable=SC2086
ray job submit --address "$RAY_DASHBOARD" --working-dir . --runtime-env-json "$JOB_RUNTIME_ENV" -- \
    python pipelines/shard_kinetics.py --annotations "$DATA/sample/annotations" --videos "$DATA/sample/videos" \
    --output "$DATA/shards" --workers 2 --shard-size 2MB --overwrite ${SHARD_ARGS:-}

echo "== shards written to $DATA/shards (WebDataset tars + DALI .idx per split; layout in docs/shard_format.md)"
$PYTHON -m shards.summary "$DATA/shards"
