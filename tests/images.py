"""Damaged copies of real images, the "clearly worse than real" side that every metric test scores."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def blurred(images: np.ndarray) -> np.ndarray:
    """A 5x5 box blur: the digits stay recognisable to a person but lose their strokes' edges."""
    x = torch.as_tensor(images).float()
    x = F.avg_pool2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), 5, stride=1)
    return x.round().clamp(0, 255).to(torch.uint8).numpy()


def noise_like(images: np.ndarray) -> np.ndarray:
    """Uniform uint8 noise of the same shape, seeded: no structure at all."""
    return np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
