"""Which float precision a CPU computes fast: the one check training and sampling share.

bf16 is fast on a CPU only where the CPU multiplies it in hardware (AVX-512 BF16 or AMX tiles); elsewhere oneDNN
emulates it, far slower than float32. Training (`punkdiff.training.speed.precision_for`) and sampling
(`punkdiff.sampling.sampling_precision`) both ask `cpu_has_native_bf16`, so they never disagree about a machine.
This module imports torch only when asked, so the CLI's parser can take its names without it.
"""

from __future__ import annotations

# What sampling's `precision=` (and `punkdiff sample --precision`) takes: "auto" is bf16 autocast where the CPU
# computes bf16 natively, else the weights' own dtype.
SAMPLING_PRECISIONS = ("auto", "float32", "bfloat16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX tiles), which oneDNN's bf16 kernels need."""
    import torch

    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
