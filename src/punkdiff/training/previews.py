"""Sample grids from the EMA weights during training, drawn the same way every time so they compare over steps."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from punkdiff.presets import DDIM_ETA, TrainSpec
from punkdiff.seeds import image_generators
from punkdiff.training.conditioning import TrainingCondition, grid_requests
from punkdiff.training.ema import averaged_weights
from punkdiff.training.reporting import log_image
from punkdiff.visuals import display_scale, image_grid

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel


def ema_sample_grid(
    unet: UNet2DModel,
    ema: EMAModel | None,
    noise_scheduler: DDPMScheduler,
    num_images: int,
    num_inference_steps: int,
    seed: int,
    palette: np.ndarray | None = None,
    eta: float = DDIM_ETA,
    condition: TrainingCondition | None = None,
) -> Image.Image:
    """A DDIM grid from the EMA weights in eval mode, image i from its own generator seeded `seed + i`; pixel art
    is snapped to its training `palette` (uint8 `[P, C]`), as the exported pipeline will do. A conditional run's grid
    asks for fixed conditions instead (`grid_requests`: a row per class), at least `num_images` of them.

    Examples:
        ```py
        >>> grid = ema_sample_grid(unet, ema, noise_scheduler, num_images=16, num_inference_steps=50, seed=0)
        >>> grid.save("samples/step-0001000.png")
        ```
    """
    from punkdiff.pipelines import PunkDiffPipeline  # diffusers: imported when used, so the CLI starts fast

    requests, columns = grid_requests(condition.vocabulary, num_images) if condition is not None else ({}, None)
    num_images = len(next(iter(requests.values()))) if requests else num_images
    with averaged_weights(unet, ema) as averaged, (
            condition.averaged() if condition is not None else contextlib.nullcontext({})) as conditioned:
        pipe = PunkDiffPipeline(unet=averaged, scheduler=noise_scheduler, **conditioned)
        pipe.palette = torch.as_tensor(palette) if palette is not None else None
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=num_images,
            generator=image_generators(seed, num_images),
            sampler="ddim",
            num_inference_steps=num_inference_steps,
            eta=eta,
            **requests,
        ).images
    return image_grid(images, cols=columns, scale=display_scale(unet.config.sample_size), gap=1)


class SampleGrids:
    """The run's preview grids: `grids(step)` draws `ema_sample_grid`, saves `samples/step-NNNNNNN.png` and logs it.

    Examples:
        ```py
        >>> grids = SampleGrids(accelerator, output_dir, unet, ema, noise_scheduler, preset.train, seed=0)
        >>> grids(1000).size
        (154, 154)
        ```
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path, unet: UNet2DModel, ema: EMAModel | None,
                 noise_scheduler: DDPMScheduler, train_spec: TrainSpec, seed: int,
                 palette: np.ndarray | None = None, condition: TrainingCondition | None = None) -> None:
        self.accelerator, self.folder = accelerator, Path(output_dir) / "samples"
        self.unet, self.ema, self.noise_scheduler = unet, ema, noise_scheduler
        self.num_images, self.num_inference_steps = train_spec.num_sample_images, train_spec.sample_inference_steps
        self.seed, self.palette, self.eta = seed, palette, train_spec.sample_eta
        self.condition = condition

    def __call__(self, step: int) -> Image.Image:
        """A DDIM grid from the EMA weights with a fixed seed, saved and logged, comparable over time."""
        grid = ema_sample_grid(self.unet, self.ema, self.noise_scheduler, self.num_images, self.num_inference_steps,
                               self.seed, palette=self.palette, eta=self.eta, condition=self.condition)
        self.folder.mkdir(parents=True, exist_ok=True)
        grid.save(self.folder / f"step-{step:07d}.png")
        log_image(self.accelerator, "samples", grid, step)
        return grid
