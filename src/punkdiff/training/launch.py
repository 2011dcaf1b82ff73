"""The Accelerator a run trains with: one process group on CPUs too, and the precision the device really runs."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration

from punkdiff.presets import TrainSpec
from punkdiff.training.reporting import precision_used
from punkdiff.training.resources import cpu_threads_warning
from punkdiff.training.speed import precision_for


def make_accelerator(args: argparse.Namespace, train_spec: TrainSpec) -> tuple[Accelerator, str, str | None]:
    """`(accelerator, precision asked of Accelerate, why it differs from the preset's or None)`.

    `--multi_gpu` on a machine without a GPU is one run over gloo, not N independent runs writing over each other;
    bf16 is asked for on a CPU only where it is native (`speed.precision_for`); batches come from a seedable sampler.
    """
    several_cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    device = PartialState(cpu=several_cpu_processes).device
    precision, fallback = precision_for(train_spec.mixed_precision, device)
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        cpu=several_cpu_processes,
        gradient_accumulation_steps=train_spec.gradient_accumulation_steps,
        mixed_precision=precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed, non_blocking=True),
    )
    return accelerator, precision, fallback


def warn_about_device(accelerator: Accelerator, train_spec: TrainSpec, precision: str, fallback: str | None) -> str:
    """Say where the run will be slower than asked (too few CPU threads, no native bf16, no fp16 on a CPU); the
    precision it really trains in."""
    few_threads = cpu_threads_warning(accelerator.device.type, accelerator.num_processes)
    if few_threads:
        accelerator.print(few_threads)
    if fallback:
        accelerator.print(f"warning: {fallback}")
    used = precision_used(accelerator, precision)
    if used != precision:
        accelerator.print(f"warning: --mixed-precision {train_spec.mixed_precision} is not available on "
                          f"{accelerator.device.type}: training in {used} (float32)")
    return used


def end_run(accelerator: Accelerator, keep_process_group: bool = False) -> None:
    """Close the trackers and, unless more runs follow in this launch (the stages of `distill.py`), the process
    group: Accelerate's `end_training` destroys it, and a later stage's first collective would then fail."""
    if keep_process_group:
        for tracker in accelerator.trackers:
            tracker.finish()
    else:
        accelerator.end_training()
