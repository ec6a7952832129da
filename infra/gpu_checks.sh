#!/usr/bin/env bash
# The GPU half of the pipeline and training checks, in one command, for a session lent an H100/H200
# (15 minutes of device time per task, the machine's start and the wheel transfers included).
#
# On the dev machine, once (DALI, webdataset and PyAV are staged by default; the shard job in the
# test fixtures and the benchmark also needs Ray and the few of its dependencies the GPU image lacks):
#   bash ../shared/gpu/stage.sh $(bash infra/gpu_checks.sh --wheels)
# On the GPU machine, quickly one call after another: carry .gpu/c1 .. .gpu/c(N-1), each copied into
# /tmp/stage, then carry .gpu/cN and run
#   bash .gpu/cN/install.sh && bash infra/gpu_checks.sh
# Results land in $OUT (the device tool brings them back): env.txt, one log per step, and
# pipeline_throughput.md / train_throughput.md, this repo's docs with their GPU sections rewritten:
# copy those two into docs/. Each step has a time limit, so one hang cannot eat the lease.
#
# Rehearsal on any machine (CPU backend, small sizes: checks the plumbing, measures nothing):
#   GPU_CHECKS_DEVICE=cpu OUT=/tmp/gpu-checks bash infra/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --wheels ]; then
    echo "ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0"
    exit 0
fi

DEVICE=${GPU_CHECKS_DEVICE:-gpu}
OUT=${OUT:-$PWD/gpu-checks}
BENCH_DATA=${BENCH_DATA:-/tmp/vidscale-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

if [ "$DEVICE" = gpu ]; then
    TORCH_DEVICE=cuda
    PIPELINE_ARGS=(--videos-per-class 16 --batch-size 32)
    TRAIN_CONFIGS=(--config "configs/cnn_study_k400_f8.yaml model.name=tsm_r50" --config configs/sifar_b14_k400.yaml)
    TRAIN_ARGS=(data.batch_size=32 --updates 10 --repeats 3 --warmup 3)
else
    TORCH_DEVICE=cpu
    PIPELINE_ARGS=(--videos-per-class 1 --batch-size 4 --warmup 2 --batches 2 --rounds 1)
    TRAIN_CONFIGS=(--config configs/sample_tsm.yaml --config configs/sample_sifar.yaml)
    TRAIN_ARGS=(--updates 2 --repeats 1 --warmup 1)
fi

failed=()
step() {   # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, show its tail
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    echo "== $name (limit ${limit} s): ${*@Q}"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 6 "$OUT/$name.log" | sed 's/^/   /'
    echo "   -> exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: CPU only"
    "$PY" -c "import torch, nvidia.dali as d; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| dali', d.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The pipeline and loader tests on the requested DALI backend; the S3 one needs moto, not staged here.
step tests 300 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_video_pipeline.py tests/test_loader.py \
    -k "$DEVICE and not s3_bucket"

# Loader vs PyAV + DataLoader, with NVDEC utilisation and GPU memory; writes its section of the doc.
cp docs/pipeline_throughput.md "$OUT/pipeline_throughput.md"
step pipeline_throughput 300 "$PY" -m benchmarks.pipeline_throughput --device "$DEVICE" --data "$BENCH_DATA" \
    "${PIPELINE_ARGS[@]}" --doc "$OUT/pipeline_throughput.md"

# A training step fed by the loader vs the same step fed tensors held on the device, on the same shards.
if [ -f "$BENCH_DATA/shards/train/index.parquet" ]; then
    step train_throughput 300 "$PY" -m benchmarks.train_throughput --device "$TORCH_DEVICE" "${TRAIN_CONFIGS[@]}" \
        "data.train.shards=$BENCH_DATA/shards" "data.val.shards=$BENCH_DATA/shards" "${TRAIN_ARGS[@]}" \
        --out "$OUT/train_throughput.md"
else
    echo "== train_throughput: skipped, the benchmark wrote no shards to $BENCH_DATA/shards"
    failed+=(train_throughput)
fi

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "all checks passed; results in $OUT"
