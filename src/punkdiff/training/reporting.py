"""What a run reports: tracker scalars and images, peak memory, the flat config, versions, the summary file."""

from __future__ import annotations

import platform
from importlib import metadata
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from punkdiff.presets import Preset

if TYPE_CHECKING:
    from accelerate import Accelerator


def log_image(accelerator: Accelerator, name: str, image: Image.Image, step: int) -> None:
    """Send an image to every active tracker (TensorBoard, or wandb when installed and asked for)."""
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(image)}, step=step)


def peak_memory_mb(device: torch.device) -> float:
    """Peak accelerator memory on a GPU; else the process's peak resident set size (current size off Unix)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource  # Unix only
    except ImportError:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def precision_used(accelerator: Accelerator, requested: str) -> str:
    """The precision training really runs in: Accelerate turns fp16 autocast off on a CPU, which then trains fp32."""
    return requested if requested == "no" or accelerator.native_amp else "no"


def flat_config(preset: Preset) -> dict[str, Any]:
    """The preset as flat scalars, the form TensorBoard's hparams and wandb's config accept."""
    out: dict[str, Any] = {"preset": preset.name}
    for section, values in preset.to_dict().items():
        if isinstance(values, dict):
            for k, v in values.items():
                out[f"{section}.{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def package_versions() -> dict[str, str]:
    """Versions recorded in training_summary.json, so a result can be reproduced."""
    names = ["punkdiff", "torch", "diffusers", "accelerate", "datasets", "safetensors", "huggingface_hub"]
    versions = {"python": platform.python_version()}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions
