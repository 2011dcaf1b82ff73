"""Working with the EMA weights during training: swap them in to look at them, and check processes agree."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from accelerate import Accelerator
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel


@contextlib.contextmanager
def averaged_weights(unet: UNet2DModel, ema: EMAModel | None) -> Iterator[UNet2DModel]:
    """`unet` in eval mode with the EMA weights swapped in (its own weights without EMA), restored afterwards.

    What is sampled inside the block is what the exported model generates: EMA weights, no dropout.

    Examples:
        ```py
        >>> with averaged_weights(unet, ema) as averaged:
        ...     images = PunkDiffPipeline(unet=averaged, scheduler=noise_scheduler)(batch_size=16).images
        ```
    """
    was_training = unet.training
    unet.eval()
    if ema is not None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
    try:
        yield unet
    finally:
        if ema is not None:
            ema.restore(unet.parameters())
        unet.train(was_training)


def ema_weights_in_sync(accelerator: Accelerator, ema: EMAModel) -> bool:
    """Whether every process holds the same EMA weights (each updates its own copy after the all-reduce).

    Compares per-tensor float32 sums, which identical weights reproduce exactly; no float64, which MPS lacks.
    """
    checksum = torch.stack([p.float().sum() for p in ema.shadow_params])
    return bool((accelerator.gather(checksum[None]) == checksum).all())
