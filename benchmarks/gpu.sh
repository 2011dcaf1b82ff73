#!/usr/bin/env bash
# Every GPU figure of the README's "Performance" section, in one command, on one CUDA machine:
#   bash benchmarks/gpu.sh            (needs `pip install -e '.[dev,bench]'` and the mirrors in ../shared/datasets)
# Writes benchmarks/results/{train-cuda,sample-cuda,sample-cuda-mnist10k}.json and prints the tables.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
# training: celeba-64 and punks-32 at their default batch sizes, bf16, channels_last, compiled, data on the GPU;
# punkdiff vs the diffusers recipe (reproduction) vs the bare ceiling vs ddpm-pytorch, MFU, peak memory, largest batch
"$PY" benchmarks/bench_train.py --gpu --steps 50 --warmup-steps 10 --repeats 3
# sampling: DDIM-50, bf16, compiled with CUDA graphs, vs stock DDIMPipeline, at batch 16 and 256
"$PY" benchmarks/bench_sample.py --gpu
# 10,000 MNIST samples (issue 12's 1.62 M-parameter UNet at 32 px), batches of 1,000
"$PY" benchmarks/bench_sample.py --gpu --presets mnist-32-issue --batch-sizes 1000 --count 10000 --repeats 1 \
    --contenders punkdiff bare --out benchmarks/results/sample-cuda-mnist10k.json
