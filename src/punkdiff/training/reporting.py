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

    from punkdiff.training.batches import TrainingData
    from punkdiff.training.optimization import Trainables
    from punkdiff.training.progress import LoopProgress


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


def record_steps(accelerator: Accelerator, rows: list[dict[str, Any]], history: list[list[float]],
                 progress_bar: Any) -> None:
    """Send the rows `StepLog.read()` returned to the trackers, keep `[step, loss, lr]` in the run's history, and
    show the last loss and LR on the progress bar; the last row also gets the peak memory."""
    rows[-1]["peak_memory_mb"] = peak_memory_mb(accelerator.device)
    for row in rows:
        history.append([row["step"], row["loss"], row["lr"]])
        accelerator.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])
    progress_bar.set_postfix(loss=f"{rows[-1]['loss']:.4f}", lr=f"{rows[-1]['lr']:.2e}")


def start_trackers(accelerator: Accelerator, preset: Preset, num_images: int | None, global_batch: int,
                   max_steps: int, num_epochs: int) -> None:
    """Start the trackers (the main process, with the flat config) and say what the run will do."""
    if accelerator.is_main_process:
        accelerator.init_trackers("punkdiff", config=flat_config(preset))
    accelerator.print(
        f"{preset.name}: {num_images} images, {accelerator.num_processes} process(es), global batch {global_batch}, "
        f"{max_steps} optimizer steps ({num_epochs} epochs)"
    )


def run_summary(preset: Preset, accelerator: Accelerator, progress: LoopProgress, parts: Trainables,
                data: TrainingData, *, global_batch: int, wall_time_s: float, ema_in_sync: bool | None,
                resumed_from: str | None, initialized_from: str | None, mixed_precision: str) -> dict[str, Any]:
    """`training_summary.json`: what was trained, how long, how far, in which precision, on what, with which
    versions."""
    ema = parts.ema
    return {
        "preset": preset.name,
        "config": preset.to_dict(),
        "steps": progress.global_step,
        "epochs": parts.num_epochs,
        "num_processes": accelerator.num_processes,
        "global_batch_size": global_batch,
        "images_seen": progress.images_seen,
        "steps_per_epoch": data.updates_per_epoch,
        "wall_time_s": wall_time_s,
        "final_loss": progress.history[-1][1] if progress.history else None,
        "final_lr": parts.lr_scheduler.get_last_lr()[0],
        "ema_optimization_step": ema.optimization_step if ema is not None else None,
        "ema_in_sync_across_processes": ema_in_sync,
        "resumed_from": resumed_from,
        "initialized_from": initialized_from,
        "mixed_precision": mixed_precision,
        "device": str(accelerator.device),
        "versions": package_versions(),
    }
