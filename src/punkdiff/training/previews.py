"""Sample grids from the EMA weights during training, drawn the same way every time so they compare over steps."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from punkdiff.presets import DDIM_ETA
from punkdiff.seeds import image_generators
from punkdiff.training.ema import averaged_weights
from punkdiff.visuals import display_scale, image_grid

if TYPE_CHECKING:
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
) -> Image.Image:
    """A DDIM grid from the EMA weights in eval mode, image i from its own generator seeded `seed + i`; pixel art
    is snapped to its training `palette` (uint8 `[P, C]`), as the exported pipeline will do.

    Examples:
        ```py
        >>> grid = ema_sample_grid(unet, ema, noise_scheduler, num_images=16, num_inference_steps=50, seed=0)
        >>> grid.save("samples/step-0001000.png")
        ```
    """
    from punkdiff.pipelines import PunkDiffPipeline  # diffusers: imported when used, so the CLI starts fast

    with averaged_weights(unet, ema) as averaged:
        pipe = PunkDiffPipeline(unet=averaged, scheduler=noise_scheduler)
        pipe.palette = torch.as_tensor(palette) if palette is not None else None
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=num_images,
            generator=image_generators(seed, num_images),
            sampler="ddim",
            num_inference_steps=num_inference_steps,
            eta=DDIM_ETA,
        ).images
    return image_grid(images, scale=display_scale(unet.config.sample_size), gap=1)
