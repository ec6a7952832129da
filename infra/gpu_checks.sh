#!/usr/bin/env bash
# The GPU half of the pipeline and training checks, in one command, for a session lent an H100/H200
# (15 minutes of device time per task, the machine's start and the wheel transfers included; one call
# runs at most 10 minutes).
#
# On the dev machine, once: stage the wheels the GPU image lacks (DALI, webdataset and PyAV by default;
# Ray and the few of its dependencies the image lacks, for the shard job in the test fixtures and the
# benchmark; the project's timm; nvJPEG for DALI's image decoder) in as few transfers as fit:
#   bash infra/gpu_checks.sh --stage
# On the GPU machine, quickly one call after another: carry .gpu/c1 .. .gpu/c(N-1), each copied into
# /tmp/stage, then carry .gpu/cN and run (timeout_s: the budget below plus a minute)
#   bash .gpu/cN/install.sh && bash infra/gpu_checks.sh
# Results land in $OUT (the device tool brings them back): env.txt, one log per step, and
# pipeline_throughput.md / train_throughput.md, this repo's docs with their GPU sections rewritten:
# copy those two into docs/. The steps share a time budget (GPU_CHECKS_BUDGET seconds) and each has
# its own limit, so one hang cannot eat the lease; the benchmarks write their docs row by row, so a step
# stopped by its limit still brings back what it measured.
#
# Rehearsal on any machine (CPU backend, small sizes: checks the plumbing, measures nothing), with
# infra/gpu_image on PYTHONPATH to hide the modules the GPU image lacks:
#   GPU_CHECKS_DEVICE=cpu PYTHONPATH=$PWD/infra/gpu_image OUT=/tmp/gpu-checks bash infra/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."

WHEELS="ray==2.60.0 jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==0.30.0
        timm==1.0.31 nvidia-nvjpeg==13.3.2.43"
if [ "${1:-}" = --wheels ]; then
    echo $WHEELS
    exit 0
fi
if [ "${1:-}" = --stage ]; then
    # ../shared/gpu/stage.sh cuts 48 MiB chunks; one transfer carries 64 MiB with the working tree, so
    # re-cut the same bytes into the largest chunks that fit beside this tree (fewer calls, less lease).
    set -e
    bash ../shared/gpu/stage.sh $WHEELS >/dev/null
    tree=$(git ls-files -z -co --exclude-standard | du -cb --files0-from=- | tail -n 1 | cut -f 1)
    chunk=$(( (63 << 20) - tree ))
    last=$(ls -d .gpu/c* | sort -V | tail -n 1)
    mv "$last/install.sh" .gpu/install.sh
    ls .gpu/c*/part.* | sort -V | xargs cat > .gpu/wheels.tar
    rm -rf .gpu/c*
    (cd .gpu && split -b "$chunk" -d -a 1 wheels.tar part. && rm wheels.tar)
    n=0
    for part in $(ls .gpu/part.* | sort -V); do
        n=$((n + 1)); mkdir -p ".gpu/c$n"; mv "$part" ".gpu/c$n/"
    done
    mv .gpu/install.sh ".gpu/c$n/"
    echo "staged $n chunks of at most $((chunk >> 20)) MiB (the working tree is $((tree >> 10)) KiB); on the GPU machine:"
    for i in $(seq 1 $((n - 1))); do
        echo "  carry .gpu/c$i: mkdir -p /tmp/stage && cp .gpu/c$i/part.* /tmp/stage/"
    done
    # The benchmarks' 300-frame clips (about 50 MB) travel too where they exist here: rendering them there
    # takes minutes of the lease.
    clips=${BENCH_DATA:-/tmp/vidscale-bench300}
    if [ -f "$clips/shards/manifest.json" ]; then
        mkdir -p .gpu/bench && cp -r "$clips/shards" .gpu/bench/
        echo "  carry .gpu/bench: mkdir -p $clips && cp -r .gpu/bench/shards $clips/"
    fi
    echo "  carry .gpu/c$n: bash .gpu/c$n/install.sh && bash infra/gpu_checks.sh"
    exit 0
fi

DEVICE=${GPU_CHECKS_DEVICE:-gpu}
OUT=${OUT:-$PWD/gpu-checks}
BENCH_DATA=${BENCH_DATA:-/tmp/vidscale-bench300}
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECKS_BUDGET:-420}   # seconds for every step together
mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0

if [ "$DEVICE" = gpu ]; then
    TORCH_DEVICE=cuda
    PIPELINE_ARGS=(--batch-size 32 --sweep-pipelines 1 2 4 7)
    TRAIN_CONFIGS=(--config "configs/cnn_study_k400_f8.yaml model.name=tsm_r50" --config configs/sifar_b14_k400.yaml)
    TRAIN_ARGS=(data.batch_size=32 --updates 10 --repeats 3 --warmup 3)
    TRAIN_COPIES=40     # 48 clips x 40 = 60 batches of 32 per epoch: 4 windows of 3 + 10 updates and the ceiling's
else
    TORCH_DEVICE=cpu
    PIPELINE_ARGS=(--batch-size 4 --warmup 2 --batches 2 --rounds 1 --sweep-pipelines 1 2)
    TRAIN_CONFIGS=(--config configs/sample_tsm.yaml --config configs/sample_sifar.yaml)
    TRAIN_ARGS=(--updates 2 --repeats 1 --warmup 1)
    TRAIN_COPIES=1
fi

failed=()
step() {   # step NAME SECONDS COMMAND...: run within its limit and what is left of the budget, log to $OUT/NAME.log
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    local left=$((BUDGET - SECONDS))
    if [ "$left" -lt 30 ]; then
        echo "== $name: skipped, ${left} s left of the ${BUDGET} s budget"
        failed+=("$name")
        return
    fi
    [ "$limit" -le "$left" ] || limit=$left
    echo "== $name (limit ${limit} s): ${*@Q}"
    timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n 8 "$OUT/$name.log" | sed 's/^/   /'
    echo "   -> exit $rc after $((SECONDS - start)) s"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "no nvidia-smi: CPU only"
    "$PY" -c "import torch, nvidia.dali as d; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), '| dali', d.__version__)"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# The pipeline, augmentation and loader tests on the requested DALI backend; the S3 one needs moto, not staged here.
step tests 150 "$PY" -m pytest -q -ra -p no:cacheprovider tests/test_video_pipeline.py tests/test_augment.py \
    tests/test_loader.py -k "$DEVICE and not s3_bucket"

# Loader vs PyAV + DataLoader, with NVDEC utilisation and GPU memory; writes its section of the doc.
cp docs/pipeline_throughput.md "$OUT/pipeline_throughput.md"
step pipeline_throughput 210 "$PY" -m benchmarks.pipeline_throughput --device "$DEVICE" --data "$BENCH_DATA" \
    "${PIPELINE_ARGS[@]}" --doc "$OUT/pipeline_throughput.md"

# A training step fed by the loader vs the same step fed tensors held on the device, on the same shards.
cp docs/train_throughput.md "$OUT/train_throughput.md"
# Each clip listed several times, so that a window never spans an epoch boundary (it would time the epoch start).
if [ -f "$BENCH_DATA/shards/train/index.parquet" ]; then
    shards=$("$PY" -m benchmarks.clip_shards "$BENCH_DATA" --copies "$TRAIN_COPIES" | tail -n 1)
    step train_throughput 210 "$PY" -m benchmarks.train_throughput --device "$TORCH_DEVICE" "${TRAIN_CONFIGS[@]}" \
        "data.train.shards=$shards" "data.val.shards=$shards" "${TRAIN_ARGS[@]}" --out "$OUT/train_throughput.md"
else
    echo "== train_throughput: skipped, the benchmark wrote no shards to $BENCH_DATA/shards"
    failed+=(train_throughput)
fi

if [ "${#failed[@]}" -gt 0 ]; then
    echo "failed: ${failed[*]} (logs in $OUT)"
    exit 1
fi
echo "all checks passed; results in $OUT"
