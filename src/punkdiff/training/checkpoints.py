"""Crash-safe Accelerate checkpoints: model, optimizer, LR schedule, RNG states, EMA weights, noise generator.

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-save never leaves a
half-written `checkpoint-N` where resume would pick it up. Everything punkdiff adds to Accelerate's state is
safetensors or JSON. Every file's SHA-256 goes into `checksums.json`, checked before a resume loads anything, so a
truncated or bit-flipped file (a full disk, a bad copy, a failing drive) is found, named and never trusted: `latest`
falls back to the previous good checkpoint, and an explicitly named damaged one is refused. The same check means
Accelerate's pickled RNG and optimizer files are only ever read back exactly as punkdiff wrote them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from punkdiff.files import disk_full_message, folder_bytes, is_disk_full
from punkdiff.training import TrainingError
from punkdiff.training.resources import CHECKPOINT_BYTES_PER_PARAMETER

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
MANIFEST = "checksums.json"
EMA_FOLDER = "unet_ema"
ENCODER_EMA_FOLDER = "attribute_encoder_ema"  # a conditional run's attribute encoder (Accelerate's model_1)


class DamagedCheckpointWarning(UserWarning):
    """`latest` skipped a damaged checkpoint; the message names the file."""


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state file) under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _CHECKPOINT_RE.match(d.name))]
    return [d for _, d in sorted(found) if (d / STATE_FILE).is_file()]


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """`latest` -> the newest intact checkpoint under output_dir (None if there is none); else the path, checked.

    A damaged checkpoint is skipped by `latest` with a `DamagedCheckpointWarning` naming the bad file, and refused
    with a `TrainingError` when named explicitly.

    Examples:
        ```py
        >>> find_checkpoint("outputs/mnist16", "latest")
        PosixPath('outputs/mnist16/checkpoints/checkpoint-1500')
        ```
    """
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"{path} is not a complete punkdiff checkpoint (no {STATE_FILE})")
        problem = checkpoint_problem(path)
        if problem:
            raise TrainingError(
                f"{path} is damaged ({problem}): resume from an earlier checkpoint or with "
                "--resume-from-checkpoint latest, which skips damaged ones"
            )
        return path
    for checkpoint in reversed(list_checkpoints(output_dir)):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            return checkpoint
        warnings.warn(f"{checkpoint} is damaged ({problem}): skipped, trying the one before", DamagedCheckpointWarning,
                      stacklevel=2)
    return None


def checkpoint_problem(checkpoint: Path) -> str | None:
    """What is wrong with a checkpoint's files (missing, truncated, altered), or None if all match their checksums.

    A checkpoint from before checksums existed is checked only for a readable state file.
    """
    try:
        json.loads((checkpoint / STATE_FILE).read_text())
        if not (checkpoint / MANIFEST).is_file():
            return None
        expected = json.loads((checkpoint / MANIFEST).read_text())
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} or {MANIFEST} is unreadable: {err}"
    for name, digest in expected.items():
        path = checkpoint / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != digest:
            return f"{name} does not match its checksum (truncated or altered)"
    return None


def resume_hint(output_dir: str | Path) -> str:
    """What a stopped run keeps and how to continue it, true to what is on disk."""
    checkpoints = list_checkpoints(output_dir)
    if not checkpoints:
        return "no checkpoint was saved yet, so the run must start again"
    return f"the last good checkpoint {checkpoints[-1]} is kept: continue with --resume-from-checkpoint latest"


def require_finite_weights(model: torch.nn.Module, ema: EMAModel | None, step: int) -> None:
    """Refuse to save (or export) weights with NaN or infinity: a checkpoint of them would resume a dead run."""
    tensors = [("weights", p) for p in model.parameters()]
    tensors += [("EMA weights", p) for p in ema.shadow_params] if ema is not None else []
    bad = sorted({name for name, p in tensors if not torch.isfinite(p).all()})
    if bad:
        raise TrainingError(
            f"the {' and '.join(bad)} became non-finite (NaN or infinity) by step {step}: nothing was saved. Lower "
            "--learning-rate, keep gradient clipping (train.max_grad_norm) or use --mixed-precision no"
        )


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    state: dict[str, Any],
    noise_rng: torch.Generator,
    total_limit: int | None,
) -> Path:
    """`accelerator.save_state` into a temporary folder, then an atomic rename to `checkpoint-<global_step>`.

    `state` is the loop's position and settings (JSON); `noise_rng` is this process's generator of timesteps,
    noise and flips. Older checkpoints beyond `total_limit` are removed only after the new one is complete.
    """
    root = Path(output_dir) / "checkpoints"
    final = root / f"checkpoint-{state['global_step']}"
    tmp = root / f".tmp-{final.name}"
    try:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp))
        save_file({"state": noise_rng.get_state()}, tmp / _noise_rng_file(accelerator.process_index))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (tmp / STATE_FILE).write_text(json.dumps(state))
            files = sorted(p for p in tmp.rglob("*") if p.is_file())
            (tmp / MANIFEST).write_text(json.dumps({p.relative_to(tmp).as_posix(): _sha256(p) for p in files}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
    except Exception as err:  # a full disk (an OSError, or torch's or safetensors' writer), a read-only folder
        if not isinstance(err, OSError) and not is_disk_full(err):
            raise
        written = folder_bytes(tmp)
        shutil.rmtree(tmp, ignore_errors=True)  # a partial checkpoint would keep the disk full
        if is_disk_full(err):
            previous = list_checkpoints(output_dir)
            needed = folder_bytes(previous[-1]) if previous else max(written, _state_bytes(accelerator))
            raise TrainingError(
                f"could not write {final.name}: {disk_full_message(root, needed, 'a checkpoint of this run')}; the "
                f"partial checkpoint was removed. Free some space, lower --checkpoints-total-limit or choose another "
                f"--output-dir; {resume_hint(output_dir)}") from err
        raise TrainingError(f"could not write {final.name} ({err}); {resume_hint(output_dir)}") from err
    if accelerator.is_main_process and total_limit:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def _state_bytes(accelerator: Accelerator) -> int:
    """About the size of one checkpoint: float32 weights, AdamW's two moments and the EMA weights, per parameter."""
    return CHECKPOINT_BYTES_PER_PARAMETER * sum(p.numel() for model in accelerator._models for p in model.parameters())


def load_checkpoint(accelerator: Accelerator, path: Path, noise_rng: torch.Generator) -> None:
    """Restore model, optimizer, LR schedule, EMA (through the hooks), RNG states and the noise generator."""
    accelerator.load_state(str(path))
    noise_rng.set_state(load_file(path / _noise_rng_file(accelerator.process_index))["state"])


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel, folder: str = EMA_FOLDER,
                       model_index: int = 0) -> None:
    """Save and restore the EMA weights of the `model_index`-th prepared model with every Accelerate checkpoint,
    as `folder` (a diffusers model folder: `unet_ema/` for the UNet).

    `EMAModel.save_pretrained` writes the EMA counters (decay, optimization step, ...) into that folder's config;
    loading reads them back with the weights, from safetensors only.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            # save_pretrained builds a UNet, whose initialisation draws from the global RNG that dropout uses: without
            # the fork, how often a run checkpoints (or a SIGTERM) would change the rest of its training
            with torch.random.fork_rng(devices=[]):
                ema.save_pretrained(os.path.join(output_dir, folder))

    def load_hook(models, input_dir):
        path = Path(input_dir) / folder
        counters = json.loads((path / "config.json").read_text())
        saved = load_file(path / "diffusion_pytorch_model.safetensors")
        names = [name for name, _ in accelerator.unwrap_model(models[model_index]).named_parameters()]
        ema.load_state_dict({
            **{k: v for k, v in counters.items() if k in ema.state_dict()},
            "shadow_params": [saved[name] for name in names],
        })
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def register_state_hooks(accelerator: Accelerator, owner: Any, folder: str) -> None:
    """Save and restore what `owner` learns beside the model (`owner.save_state(path)`, `owner.load_state(path)`:
    distribution matching's fake denoiser) with every Accelerate checkpoint, in its `folder`. Every process holds
    the same state, so the main process writes it."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            owner.save_state(Path(output_dir) / folder)

    def load_hook(models, input_dir):
        owner.load_state(Path(input_dir) / folder)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _noise_rng_file(process_index: int) -> str:
    return f"noise_rng_{process_index}.safetensors"
