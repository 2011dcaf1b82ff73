"""`--init-from`: start training from the UNet of an exported pipeline or a Hub model (fine-tuning)."""

from __future__ import annotations

import json
import os

import torch
from diffusers import UNet2DModel

from punkdiff.hub import model_folder
from punkdiff.presets import Preset
from punkdiff.training import TrainingError


def load_initial_unet(model: str | os.PathLike[str], preset: Preset) -> UNet2DModel:
    """The pretrained UNet of `model` (a folder or Hub id), after checking it is the preset's model and schedule.

    Fine-tuning keeps the architecture, and a UNet trained for another noise schedule or prediction target would
    start from the wrong denoiser; either mismatch is refused with the differing fields listed.

    Examples:
        ```py
        >>> unet = load_initial_unet("outputs/mnist16/pipeline", get_preset("mnist-baseline-16"))
        ```
    """
    folder = model_folder(model)
    with torch.device("meta"):  # the config diffusers fills in, without allocating weights
        expected = dict(UNet2DModel(**preset.model.unet_config()).config)
    saved = json.loads((folder / "unet" / "config.json").read_text())
    problems = [
        f"unet {key}: preset {_plain(value)}, model {_plain(saved.get(key))}"
        for key, value in expected.items()
        if not key.startswith("_") and _plain(value) != _plain(saved.get(key, value))
    ]
    schedule = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    problems += [
        f"scheduler {key}: preset {value}, model {schedule.get(key)}"
        for key, value in preset.scheduler.ddpm_config().items()
        if key in schedule and _plain(value) != _plain(schedule[key])
    ]
    if problems:
        raise TrainingError(
            f"--init-from {model} is not the preset's model ({'; '.join(problems)}): use the preset it was trained "
            "with, or --set model.* / scheduler.* to match it"
        )
    return UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True)


def _plain(value: object) -> object:
    """JSON's view of a config value (tuples and lists compare equal)."""
    return json.loads(json.dumps(value))
