"""Tiny randomly initialised models shared by the pipeline, hub and CLI tests (fast on 2 CPU cores)."""

from __future__ import annotations

import torch
from diffusers import DDPMScheduler, UNet2DModel

from punkdiff import PunkDiffPipeline


def tiny_unet(channels: int = 3, sample_size: int = 8, seed: int = 0, **overrides) -> UNet2DModel:
    """An 8/16-channel UNet2DModel, seeded; `overrides` go to its config (e.g. `dropout=0.5`)."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=channels,
        out_channels=channels,
        layers_per_block=1,
        block_out_channels=(8, 16),
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **overrides,
    )


def tiny_pipeline(channels: int = 3, sample_size: int = 8) -> PunkDiffPipeline:
    pipe = PunkDiffPipeline(tiny_unet(channels, sample_size), DDPMScheduler(num_train_timesteps=1000))
    pipe.set_progress_bar_config(disable=True)
    return pipe
