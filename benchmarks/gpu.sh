#!/usr/bin/env bash
# Every GPU figure of the benchmarks in one command, on a CUDA machine with torch that may lack diffusers and
# datasets and reach no package registry (docs/gpu.md says how to prepare and call it):
#   bash benchmarks/gpu.sh                 # CUDA: each figure within its time budget, 530 s in all
#   bash benchmarks/gpu.sh --device cpu    # dry run: the same steps and code paths on the CPU, tiny counts
# Installs the wheels in .whl/ (`make gpu-bundle`) and this tree into a scratch folder when .whl/ exists, reads the
# mirrors from .device/datasets/ when it exists (else $PUNKDIFF_SHARED_DATASETS or ../shared/datasets), and writes
# env-, train-, sample-<device>*.json and gpu-<device>.log into $OUT (default benchmarks/results).
# Environment: PYTHON (default python3), GPU_BUDGET_S (the total, default 530 s; on the CPU each step's time and the
# total are 4 times as long). Exits 1 if a step failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
while [ $# -gt 0 ]; do
    case "$1" in
        --device) DEVICE=${2:-}; shift $(($# > 1 ? 2 : 1)) ;;
        --device=*) DEVICE=${1#*=}; shift ;;
        -h | --help) sed -n '2,10p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1' (usage: bash benchmarks/gpu.sh [--device cuda|cpu])" >&2; exit 2 ;;
    esac
done
case "$DEVICE" in
    cuda | cpu) ;;
    *) echo "gpu.sh: --device takes cuda or cpu, not '$DEVICE'" >&2; exit 2 ;;
esac

PY=${PYTHON:-python3}
SCALE=$([ "$DEVICE" = cpu ] && echo 4 || echo 1)
BUDGET=$((${GPU_BUDGET_S:-530} * SCALE))
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd) || exit 1
exec > >(tee "$OUT/gpu-$DEVICE.log") 2>&1
TEE=$!
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ -z "${PUNKDIFF_SHARED_DATASETS:-}" ] && [ -d .device/datasets ]; then
    export PUNKDIFF_SHARED_DATASETS=$PWD/.device/datasets
fi

START=$SECONDS
FAILED=0
SUMMARY=()

# step NAME CAP_S COMMAND...: runs COMMAND for at most CAP_S seconds and never past the total budget. The caps add up
# to more than the total: a step that needs longer than expected may, and the last steps give way.
step() {
    local name=$1 cap=$(($2 * SCALE)) left=$((BUDGET - (SECONDS - START)))
    shift 2
    local budget=$((cap < left ? cap : left)) began=$SECONDS rc status
    if [ "$budget" -lt 20 ]; then
        status="skipped: ${left}s of the budget left"
        rc=1
    else
        echo "== $(date -u +%H:%M:%S) [$((SECONDS - START))s] $name (at most ${budget}s)"
        timeout --signal=INT --kill-after=15 "$budget" "$@"
        rc=$?
        case $rc in
            0) status=ok ;;
            124 | 137) status="out of time" ;;
            *) status="failed (exit $rc)" ;;
        esac
    fi
    echo "== $name: $status after $((SECONDS - began))s"
    SUMMARY+=("$(printf '%-20s %-26s %4ss of %ss' "$name" "$status" "$((SECONDS - began))" "$budget")")
    [ "$rc" -eq 0 ] || FAILED=1
    return "$rc"
}

finish() {
    echo "== summary ($DEVICE, $((SECONDS - START))s of ${BUDGET}s; results in $OUT)"
    printf '%s\n' "${SUMMARY[@]}"
    exec >&- 2>&-
    wait "$TEE"  # the log is whole before $OUT is read
    exit "$FAILED"
}

command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ -d .whl ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/punkdiff-gpu-site.XXXXXX") || exit 1
    trap 'rm -rf "$SITE"' EXIT
    # the carried wheels and this tree (setup.cfg maps pipelines/, training/, app/ into the package), no index
    step install 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --no-build-isolation \
        --disable-pip-version-check --target "$SITE" .whl/*.whl . || finish
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
step check-env 60 "$PY" benchmarks/check_env.py --device "$DEVICE" --out "$OUT/env-$DEVICE.json" || finish

if [ "$DEVICE" = cuda ]; then
    # bf16, channels_last, compiled, data on the GPU; punkdiff vs the diffusers recipe (reproduction) vs the bare
    # ceiling vs ddpm-pytorch; MFU, peak memory, largest batch. One preset per process: one running out of time
    # costs only its own figures.
    TRAIN=(--gpu --warmup-steps 10 --steps 50 --repeats 3)
    # DDIM-50, bf16, compiled with CUDA graphs, against stock DDIMPipeline, at batch 16 and 256
    SAMPLE=(--gpu)
    # 10,000 samples of the 1.62 M-parameter MNIST UNet at 32 px, batches of 1,000
    MANY=(--gpu --batch-sizes 1000 --count 10000 --repeats 1)
else
    # the same scripts and options but compilation (minutes on a CPU) and the GPU-only largest-batch search;
    # batch 16 is the smallest denoising-diffusion-pytorch's Trainer takes
    TRAIN=(--device cpu --bf16 --channels-last --batch-size 16 --warmup-steps 1 --steps 2 --repeats 1)
    SAMPLE=(--device cpu --bf16 --channels-last --batch-sizes 2 --steps 2 --repeats 1)
    MANY=(--device cpu --bf16 --channels-last --batch-sizes 10 --count 20 --steps 2 --repeats 1)
fi
step train-celeba-64 220 "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --presets celeba-64 \
    --out "$OUT/train-$DEVICE-celeba-64.json"
step train-punks-32 170 "$PY" benchmarks/bench_train.py "${TRAIN[@]}" --presets punks-32 \
    --out "$OUT/train-$DEVICE-punks-32.json"
step sample 130 "$PY" benchmarks/bench_sample.py "${SAMPLE[@]}" --presets celeba-64 punks-32 \
    --out "$OUT/sample-$DEVICE.json"
step sample-mnist10k 70 "$PY" benchmarks/bench_sample.py "${MANY[@]}" --presets mnist-32-bench \
    --contenders punkdiff bare --out "$OUT/sample-$DEVICE-mnist10k.json"
finish
