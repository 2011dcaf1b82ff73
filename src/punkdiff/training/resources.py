"""The resources a run needs, checked before it trains and explained when they run out: writable output folders,
disk space for the checkpoints kept, and accelerator memory (which batch size to try instead).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from punkdiff.presets import Preset, count_parameters
from punkdiff.training import TrainingError

# bytes per parameter in one checkpoint: float32 weights, AdamW's two moments, float32 EMA weights
CHECKPOINT_BYTES_PER_PARAMETER = 4 + 8 + 4


def check_writable(folder: str | os.PathLike[str], what: str) -> Path:
    """Create `folder` if needed and prove a file can be written in it; a `TrainingError` says what is wrong.

    Catches a path that is a file or lies under one, read-only and immutable folders, and pseudo file systems
    such as /proc.

    Examples:
        ```py
        >>> check_writable("outputs/mnist16", "--output-dir")
        PosixPath('outputs/mnist16')
        ```
    """
    folder = check_not_under_a_file(folder, what)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".punkdiff-write-check-"):
            pass
    except OSError as err:
        raise TrainingError(
            f"{what} {folder} is not writable ({err.strerror or err}): choose a folder you can write to"
        ) from err
    return folder


def check_not_under_a_file(folder: str | os.PathLike[str], what: str) -> Path:
    """`folder`, unless it is a file or lies under one (a mistyped path): then a `TrainingError` naming the file."""
    folder = Path(folder).expanduser()
    for parent in [folder, *folder.parents]:
        if parent.exists() and not parent.is_dir():
            raise TrainingError(f"{what} {folder}: {parent} is a file, not a folder; choose another path")
    return folder


def check_run_outputs(output_dir: str | os.PathLike[str], cache_dir: str | os.PathLike[str], preset: Preset) -> None:
    """Before training: the output folder is writable, the disk holds the checkpoints kept, and the cache folder is
    not a file. A read-only cache folder is no error: a good cache in it is read, else `punkdiff.data` decodes into
    memory for the run and says how to cache instead.

    The space needed is estimated from the parameter count: each checkpoint holds the weights, AdamW's moments and
    the EMA weights in float32, `checkpoints_total_limit` of them plus the one being written, and the export.
    """
    output_dir = check_writable(output_dir, "--output-dir")
    check_not_under_a_file(cache_dir, "--cache-dir")
    parameters = count_parameters(preset.model)
    kept = (preset.train.checkpoints_total_limit or 1) + 1
    needed = parameters * (CHECKPOINT_BYTES_PER_PARAMETER * kept + 4)
    free = shutil.disk_usage(output_dir).free
    if free < needed:
        raise TrainingError(
            f"--output-dir {output_dir} has {free / 2**20:.0f} MB free, but {kept - 1} checkpoint(s) of this "
            f"{parameters / 1e6:.1f}M-parameter model and the export need about {needed / 2**20:.0f} MB: free some "
            "space, lower --checkpoints-total-limit, or choose another --output-dir"
        )


def cpu_threads_warning(device_type: str, num_processes: int) -> str | None:
    """Why a CPU run would use fewer cores than the machine has, and the launch flag that fixes it.

    `accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise, so a one-process CPU run trains on one
    core whatever the machine has. `--cpu` alone does not change that on a machine without a GPU (accelerate then
    counts 0 processes and skips its thread sizing); `--num_cpu_threads_per_process N` always does, and so does
    `--cpu --num_processes 1`.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    share = cores // max(num_processes, 1)
    if device_type != "cpu" or torch.get_num_threads() >= share:
        return None
    return (f"warning: training on {torch.get_num_threads()} CPU thread(s) of the {share} this process could use "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, which `accelerate launch` sets to 1 "
            f"unless told otherwise): use `accelerate launch --num_cpu_threads_per_process {share} ...` "
            "(or `--cpu --num_processes 1`; `--cpu` alone leaves one thread on a machine without a GPU)")


def out_of_memory_message(device: str, batch_size: int, gradient_accumulation_steps: int) -> str:
    """What to do when a batch does not fit: halve the batch, double accumulation, so the global batch is unchanged.

    Examples:
        ```py
        >>> out_of_memory_message("cuda:0", 64, 1)
        'out of memory on cuda:0 with --batch-size 64: try --batch-size 32 --gradient-accumulation-steps 2 ...'
        ```
    """
    if batch_size == 1:
        return (f"out of memory on {device} even with --batch-size 1: use a smaller model (fewer or narrower "
                "model.block_out_channels), --mixed-precision bf16 or fp16, or a device with more memory")
    smaller = batch_size // 2
    accumulation = gradient_accumulation_steps * batch_size // smaller
    return (f"out of memory on {device} with --batch-size {batch_size}: try --batch-size {smaller} "
            f"--gradient-accumulation-steps {accumulation} (the same images per optimizer step), or "
            "--mixed-precision bf16/fp16; resume from the last checkpoint with --resume-from-checkpoint latest")
