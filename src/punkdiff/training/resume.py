"""Resume policy: which checkpoint a run continues from, whether this run's settings allow it, and restoring it.

A resumed run must be the run that was interrupted: the same model, noise process, data and batching (the saved
data position counts batches) and the same number of processes. Anything else is refused before any data loads,
with the differences listed; a run is made longer only on request (`--extend-schedule`). An output folder is never
shared by two runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from punkdiff.presets import DataSpec, ModelSpec, Preset, SchedulerSpec, TrainSpec
from punkdiff.training import TrainingError
from punkdiff.training.checkpoints import STATE_FILE, find_checkpoint, list_checkpoints, load_checkpoint
from punkdiff.training.progress import LoopProgress

if TYPE_CHECKING:
    import torch
    from accelerate import Accelerator
    from diffusers import UNet2DModel

# what may differ between a checkpoint and the run resuming it: where and how often things are saved and previewed.
# Everything else (model, noise process, data, batching, optimizer, LR, EMA, precision, seed) is the run itself.
_RESUME_FREE = {"train.checkpoint_every", "train.checkpoints_total_limit", "train.sample_every",
                "train.num_sample_images", "train.sample_inference_steps"}
# the planned length: changing it re-plans the LR schedule, so it needs --extend-schedule
_SCHEDULE_LENGTH = ("train.max_steps", "train.epochs")


def check_resume(
    output_dir: str | Path,
    which: str | None,
    preset: Preset,
    num_processes: int,
    overwrite: bool = False,
    *,
    seed: int | None = None,
    extend_schedule: bool = False,
    streaming: bool = False,
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its saved state, after checking it fits this run; None to start fresh.

    Without `--resume-from-checkpoint` (`which=None`), an output folder that already holds checkpoints is refused
    (unless `overwrite`): a second run there would mix its checkpoints with the first one's. A resumed run must be
    the interrupted one: any changed setting is refused with the differences named, except where checkpoints and
    previews go; a longer run needs `extend_schedule`, because it re-plans the LR schedule. A streamed run (its
    position is the stream's state) and a cached one (a batch count in a seeded order) do not resume each other.

    Examples:
        ```py
        >>> check_resume("outputs/mnist16", "latest", preset, num_processes=1, seed=0)
        (PosixPath('outputs/mnist16/checkpoints/checkpoint-1500'), {'global_step': 1500, ...})
        ```
    """
    if which is None:
        if list_checkpoints(output_dir) and not overwrite:
            raise TrainingError(
                f"{Path(output_dir) / 'checkpoints'} already holds checkpoints of another run: pass "
                "--resume-from-checkpoint latest to continue it, --overwrite-output-dir to start over, "
                "or choose a new --output-dir"
            )
        return None
    checkpoint = find_checkpoint(output_dir, which)
    if checkpoint is None:
        return None
    state = json.loads((checkpoint / STATE_FILE).read_text())
    saved = _flat({**state["config"], **{section: {**_defaults(section), **values}
                                         for section, values in state["config"].items() if section in _SPECS}})
    current = _flat(preset.to_dict())
    changed = [
        f"{key}: {saved.get(key)} -> {current.get(key)}"
        for key in sorted(saved.keys() | current.keys())
        if key not in _RESUME_FREE and key not in _SCHEDULE_LENGTH and key not in ("name", "description")
        and saved.get(key) != current.get(key)
    ]
    if state["num_processes"] != num_processes:
        changed.append(f"processes: {state['num_processes']} -> {num_processes}")
    if seed is not None and state.get("seed", seed) != seed:
        changed.append(f"seed (the data order and noise): {state['seed']} -> {seed}")
    if ("stream" in state) != streaming:
        was, now = ("streamed", "cached") if "stream" in state else ("cached", "streamed")
        changed.append(f"data: {was} -> {now} (--streaming, --cache-budget)")
    if changed:
        raise TrainingError(
            f"{checkpoint} was saved by a run with other settings ({'; '.join(changed)}); resume with the same "
            "settings or start a new --output-dir"
        )
    longer = [f"{key}: {saved.get(key)} -> {current.get(key)}" for key in _SCHEDULE_LENGTH
              if saved.get(key) != current.get(key)]
    if longer and not extend_schedule:
        raise TrainingError(
            f"{checkpoint} belongs to a run planned as {' and '.join(f'{k} {saved.get(k)}' for k in _SCHEDULE_LENGTH)}"
            f" ({'; '.join(longer)}): resume with the same length to finish it, or pass --extend-schedule to "
            "continue past it with the LR schedule re-planned over the new length (the LR jumps where it resumes)"
        )
    if preset.train.max_steps is not None and state["global_step"] > preset.train.max_steps:
        raise TrainingError(
            f"{checkpoint} is at step {state['global_step']}, beyond --max-steps {preset.train.max_steps}: "
            "resume with a --max-steps of at least that, or from an earlier checkpoint"
        )
    return checkpoint, state


_SPECS = {"model": ModelSpec, "scheduler": SchedulerSpec, "data": DataSpec, "train": TrainSpec}


def _defaults(section: str) -> dict[str, Any]:
    """A section's defaults: a setting added to punkdiff after a checkpoint was saved had its default there."""
    return {f.name: f.default for f in dataclasses.fields(_SPECS[section]) if f.default is not dataclasses.MISSING}


def _flat(config: dict[str, Any]) -> dict[str, str]:
    """`{"train.learning_rate": "0.0003", ...}`: each setting as JSON text, so tuples and lists compare equal."""
    return {
        f"{section}.{key}" if isinstance(values, dict) else section: json.dumps(value, sort_keys=True)
        for section, values in config.items()
        for key, value in (values.items() if isinstance(values, dict) else [(None, values)])
    }


# what an earlier run leaves in its output folder, all of it replaced by --overwrite-output-dir
_RUN_FOLDERS = ("checkpoints", "samples", "logs")
_RUN_FILES = ("training_summary.json", "samples.png", "loss_curve.png")


def remove_previous_run(output_dir: str | Path) -> None:
    """For --overwrite-output-dir: delete an earlier run's checkpoints, grids, logs, summary and exported pipeline.

    The `pipeline/` folder is deleted only if it is an export (it has a `model_index.json`), so a mistyped
    `--output-dir` never deletes someone's own `pipeline` folder.
    """
    output_dir = Path(output_dir)
    for name in _RUN_FOLDERS:
        shutil.rmtree(output_dir / name, ignore_errors=True)
    for name in _RUN_FILES:
        (output_dir / name).unlink(missing_ok=True)
    if (output_dir / "pipeline" / "model_index.json").is_file():
        shutil.rmtree(output_dir / "pipeline")


def prepare_start(
    args: argparse.Namespace, preset: Preset, accelerator: Accelerator, streaming: bool,
    start_from: UNet2DModel | None = None,
) -> tuple[tuple[Path, dict[str, Any]] | None, UNet2DModel | None]:
    """What this run starts from, checked before any data loads: `(checkpoint and its state, or None; the
    `--init-from` UNet or `start_from`, or None when resuming)`. Also proves the output folder writable and large
    enough, and clears an earlier run's files for `--overwrite-output-dir`; every process waits until that is done."""
    from punkdiff.data import default_cache_dir
    from punkdiff.training.pretrained import load_initial_unet
    from punkdiff.training.resources import check_run_outputs

    output_dir = Path(args.output_dir)
    resume = check_resume(
        output_dir, args.resume_from_checkpoint, preset, accelerator.num_processes, args.overwrite_output_dir,
        seed=args.seed, extend_schedule=args.extend_schedule, streaming=streaming,
    )
    if accelerator.is_main_process:  # an unwritable folder is found now, not at the first checkpoint
        check_run_outputs(output_dir, args.cache_dir or default_cache_dir(), preset)
    initial_unet = None if resume is not None else (
        load_initial_unet(args.init_from, preset) if args.init_from else start_from)
    if args.overwrite_output_dir and resume is None and accelerator.is_main_process:
        remove_previous_run(output_dir)
    accelerator.wait_for_everyone()
    return resume, initial_unet


def restore_progress(args: argparse.Namespace, accelerator: Accelerator, resume: tuple[Path, dict[str, Any]] | None,
                     noise_rng: torch.Generator, loader: Any, streaming: bool, max_steps: int,
                     last_lr: Callable[[], float]) -> tuple[LoopProgress, str | None]:
    """The loop's position and the checkpoint it came from: model, optimizer, LR schedule, EMA, RNGs and the
    stream's position loaded from `resume`, or a fresh start. A `TrainingError` if the checkpoint is beyond the
    run's planned length."""
    progress, resumed_from = LoopProgress(), None
    if resume is not None:
        checkpoint, state = resume
        load_checkpoint(accelerator, checkpoint, noise_rng)
        if streaming:  # the stream continues from its saved position (each process its own shard's)
            loader.load_state_dict(state["stream"][accelerator.process_index])
        progress, resumed_from = LoopProgress.from_state(state), str(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {progress.global_step}")
    elif args.resume_from_checkpoint:
        accelerator.print(f"no checkpoint in {Path(args.output_dir) / 'checkpoints'}: starting from scratch")
    if progress.global_step > max_steps:
        raise TrainingError(f"{resumed_from} is at step {progress.global_step}, beyond {max_steps} steps: resume with "
                            "at least as many --max-steps or --epochs, or from an earlier checkpoint")
    if resume is not None and args.extend_schedule and progress.history:
        accelerator.print(f"--extend-schedule: the LR schedule is re-planned over {max_steps} steps; the LR goes "
                          f"from {progress.history[-1][2]:.3e} to {last_lr():.3e} at step {progress.global_step}")
    return progress, resumed_from
