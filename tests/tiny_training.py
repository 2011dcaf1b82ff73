"""Tiny training runs shared by the training, resume, checkpoint and crash tests (a step takes tens of ms on CPU).

A UNet with 8/16 channels on the first 64 images of the MNIST mirror, batches of 8: 8 steps per epoch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

TINY = [
    "--preset", "mnist-baseline-16", "--max-train-samples", "64", "--batch-size", "8", "--report-to", "none",
    "--sample-every", "1000", "--set", "model.block_out_channels=[8,16]", "--set", "model.norm_num_groups=4",
    "--set", "train.num_sample_images=4", "--set", "train.sample_inference_steps=3",
]


def tiny_args(mnist_dir: Path, cache_dir: Path, out: Path, *extra: str) -> list[str]:
    """The full `train.py` argument list of a tiny run writing to `out`."""
    return [*TINY, "--dataset", str(mnist_dir), "--cache-dir", str(cache_dir), "--output-dir", str(out), *extra]


def reset_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons; each in-process run starts from a clean slate."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train_tiny(mnist_dir: Path, cache_dir: Path, out: Path, *extra: str) -> int:
    """A tiny run in this process, from a clean Accelerate state (for module-scoped fixtures)."""
    from punkdiff.scripts.train import main

    reset_accelerate_state()
    try:
        return main(tiny_args(mnist_dir, cache_dir, out, *extra))
    finally:
        reset_accelerate_state()


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def exported_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
