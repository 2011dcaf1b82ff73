"""Resume policy: which checkpoint a run continues from, and whether this run's settings allow it.

A resumed run must be the run that was interrupted: the same model, noise process, data and batching (the saved
data position counts batches) and the same number of processes. Anything else is refused before any data loads,
with the differences listed. An output folder is never shared by two runs.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from punkdiff.presets import DataSpec, ModelSpec, Preset, SchedulerSpec
from punkdiff.training import TrainingError
from punkdiff.training.checkpoints import STATE_FILE, find_checkpoint, list_checkpoints

# what must not change between a checkpoint and the run resuming it
_RESUME_INVARIANTS = ("model", "scheduler", "data", "train.batch_size", "train.gradient_accumulation_steps")


def check_resume(
    output_dir: str | Path, which: str | None, preset: Preset, num_processes: int, overwrite: bool = False
) -> tuple[Path, dict[str, Any]] | None:
    """The checkpoint to resume from and its saved state, after checking it fits this run; None to start fresh.

    Without `--resume-from-checkpoint` (`which=None`), an output folder that already holds checkpoints is refused
    (unless `overwrite`): a second run there would mix its checkpoints with the first one's.

    Examples:
        ```py
        >>> check_resume("outputs/mnist16", "latest", preset, num_processes=1)
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
    saved, current = state["config"], preset.to_dict()
    changed = []
    for key in _RESUME_INVARIANTS:
        section, _, field = key.partition(".")
        before = saved[section] if not field else saved[section][field]
        if not field:  # a setting added to punkdiff after the checkpoint was saved: it had its default
            before = {**_defaults(section), **before}
        after = current[section] if not field else current[section][field]
        if json.dumps(before, sort_keys=True) != json.dumps(after, sort_keys=True):
            changed.append(f"{key}: {before} -> {after}")
    if state["num_processes"] != num_processes:
        changed.append(f"processes: {state['num_processes']} -> {num_processes}")
    if changed:
        raise TrainingError(
            f"{checkpoint} was saved by a run with other settings ({'; '.join(changed)}); resume with the same "
            "settings or start a new --output-dir"
        )
    if preset.train.max_steps is not None and state["global_step"] >= preset.train.max_steps:
        raise TrainingError(
            f"{checkpoint} is at step {state['global_step']}, already >= --max-steps {preset.train.max_steps}: "
            "pass a larger --max-steps to train further"
        )
    return checkpoint, state


def _defaults(section: str) -> dict[str, Any]:
    spec = {"model": ModelSpec, "scheduler": SchedulerSpec, "data": DataSpec}[section]
    return {f.name: f.default for f in dataclasses.fields(spec) if f.default is not dataclasses.MISSING}


def remove_previous_run(output_dir: str | Path) -> None:
    """For --overwrite-output-dir: delete an earlier run's checkpoints, sample grids and logs."""
    for name in ("checkpoints", "samples", "logs"):
        shutil.rmtree(Path(output_dir) / name, ignore_errors=True)
