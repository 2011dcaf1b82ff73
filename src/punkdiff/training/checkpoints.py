"""Crash-safe Accelerate checkpoints: model, optimizer, LR schedule, RNG states, EMA weights, noise generator.

A checkpoint is written into a temporary folder and renamed into place, so a crash mid-save never leaves a
half-written `checkpoint-N` where resume would pick it up. Everything punkdiff adds to Accelerate's state is
safetensors or JSON.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file

from punkdiff.training import TrainingError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers.training_utils import EMAModel

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "training_state.json"
EMA_FOLDER = "unet_ema"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (those with a state file) under `output_dir/checkpoints`, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), d) for d in root.iterdir() if (m := _CHECKPOINT_RE.match(d.name))]
    return [d for _, d in sorted(found) if (d / STATE_FILE).is_file()]


def find_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """`latest` -> the newest complete checkpoint under output_dir (None if there is none); else the path."""
    if which != "latest":
        path = Path(which)
        if not (path / STATE_FILE).is_file():
            raise TrainingError(f"{path} is not a complete punkdiff checkpoint (no {STATE_FILE})")
        return path
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


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
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    save_file({"state": noise_rng.get_state()}, tmp / _noise_rng_file(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: Path, noise_rng: torch.Generator) -> None:
    """Restore model, optimizer, LR schedule, EMA (through the hooks), RNG states and the noise generator."""
    accelerator.load_state(str(path))
    noise_rng.set_state(load_file(path / _noise_rng_file(accelerator.process_index))["state"])


def register_ema_hooks(accelerator: Accelerator, ema: EMAModel) -> None:
    """Save and restore the EMA weights with every Accelerate checkpoint, as `unet_ema/` (a diffusers UNet folder).

    `EMAModel.save_pretrained` writes the EMA counters (decay, optimization step, ...) into that folder's config;
    loading reads them back with the weights, from safetensors only.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            ema.save_pretrained(os.path.join(output_dir, EMA_FOLDER))

    def load_hook(models, input_dir):
        folder = Path(input_dir) / EMA_FOLDER
        counters = json.loads((folder / "config.json").read_text())
        saved = load_file(folder / "diffusion_pytorch_model.safetensors")
        names = [name for name, _ in accelerator.unwrap_model(models[0]).named_parameters()]
        ema.load_state_dict({
            **{k: v for k, v in counters.items() if k in ema.state_dict()},
            "shadow_params": [saved[name] for name in names],
        })
        ema.to(accelerator.device)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def _noise_rng_file(process_index: int) -> str:
    return f"noise_rng_{process_index}.safetensors"
