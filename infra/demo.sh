#!/usr/bin/env bash
# `make demo`: shard the embedded sample dataset the way a real job runs, through `ray job submit` to a
# Ray head on this machine, then say where the shards are and what failed.
#
# Everything stays on loopback. Knobs (environment): DEMO_DATA (default data/), SAMPLE_ARGS (extra
# arguments for the sample generator), SHARD_ARGS (extra job arguments), RAY_PORT, DASHBOARD_PORT,
# RAY_START_ARGS (extra `ray start` arguments, e.g. other ports when a second head runs on this machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
ROOT=$(pwd)
DATA=$(mkdir -p "${DEMO_DATA:-data}" && cd "${DEMO_DATA:-data}" && pwd)   # the job needs absolute paths
RAY_PORT=${RAY_PORT:-6379}
DASHBOARD_PORT=${DASHBOARD_PORT:-8265}
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}   # head and `ray job submit` must agree
[ "$RAY_AUTH_MODE" != token ] || ray get-auth-token --generate >/dev/null   # ~/.ray/auth_token, made once
HEAD_DIR=$(mktemp -d /tmp/vidscale-ray-XXXXXX)

# A private head (own temp dir, loopback only), stopped by its PID: `ray stop` would kill every Ray on the machine.
# shellcheck disable=SC2086
ray start --head --block --node-ip-address 127.0.0.1 --port "$RAY_PORT" --dashboard-host 127.0.0.1 \
    --dashboard-port "$DASHBOARD_PORT" --temp-dir "$HEAD_DIR" --disable-usage-stats ${RAY_START_ARGS:-} \
    >"$HEAD_DIR/head.log" 2>&1 &
HEAD_PID=$!
stop_head() { kill -TERM "$HEAD_PID" 2>/dev/null || true; wait "$HEAD_PID" 2>/dev/null || true; rm -rf "$HEAD_DIR"; }
trap stop_head EXIT

echo "== generating the sample dataset in $DATA/sample"
rm -rf "$DATA/sample"
# shellcheck disable=SC2086
$PYTHON -m shards.sample_dataset "$DATA/sample" ${SAMPLE_ARGS:-}

echo "== waiting for the Ray head on 127.0.0.1:$DASHBOARD_PORT"
for _ in $(seq 120); do
    ray job list --address "http://127.0.0.1:$DASHBOARD_PORT" >/dev/null 2>&1 && break
    kill -0 $HEAD_PID 2>/dev/null || { cat "$HEAD_DIR/head.log"; exit 1; }
    sleep 1
done

echo "== submitting the shard job"
# The working dir is uploaded to the cluster; data/ (and .git) stay behind, the job reads them by absolute path.
# shellcheck disable=SC2086
ray job submit --address "http://127.0.0.1:$DASHBOARD_PORT" --working-dir . \
    --runtime-env-json '{"excludes": ["data/", ".git/", "runs/", "**/__pycache__/"]}' -- \
    python pipelines/shard_kinetics.py --annotations "$DATA/sample/annotations" --videos "$DATA/sample/videos" \
    --output "$DATA/shards" --workers 2 --shard-size 2MB --overwrite ${SHARD_ARGS:-}

echo "== shards written to $DATA/shards (WebDataset tars + DALI .idx per split; layout in docs/shard_format.md)"
$PYTHON -m shards.summary "$DATA/shards"
