"""Multi-scale sliced Wasserstein distance on MNIST digits at 16 px: real vs real far below noise and blur."""

from __future__ import annotations

import numpy as np
import pytest
from images import blurred, noise_like

from punkdiff.metrics.swd import laplacian_pyramid, sliced_wasserstein_distance


def test_real_vs_real_is_far_below_noise_and_blur(mnist16):
    train, heldout = mnist16.train[::5], mnist16.heldout[:1000]
    floor = sliced_wasserstein_distance(train, heldout, patches_per_level=16384)
    blur = sliced_wasserstein_distance(train, blurred(heldout), patches_per_level=16384)
    noise = sliced_wasserstein_distance(train, noise_like(heldout), patches_per_level=16384)
    assert sorted(floor) == ["swd", "swd_16px", "swd_8px"]
    assert 3 * floor["swd_16px"] < blur["swd_16px"]  # blur removes the fine level's detail
    assert 5 * floor["swd"] < noise["swd"]


def test_same_seed_same_numbers(punks24):
    a, b = punks24.train[:200], punks24.heldout[:200]
    swd = lambda seed: sliced_wasserstein_distance(a, b, seed=seed, patches_per_level=4096)  # noqa: E731
    assert swd(1) == swd(1)
    assert swd(1) != swd(2)


def test_pyramid_levels_add_back_to_the_image():
    import torch
    import torch.nn.functional as F

    x = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    levels = laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [32, 16, 8]
    rebuilt = levels[-1]
    for detail in reversed(levels[:-1]):
        rebuilt = F.interpolate(rebuilt, size=detail.shape[-2:], mode="bilinear", align_corners=False) + detail
    torch.testing.assert_close(rebuilt, x)


def test_rejects_sets_of_different_shapes():
    with pytest.raises(ValueError, match="same shape"):
        sliced_wasserstein_distance(np.zeros((4, 1, 16, 16), np.uint8), np.zeros((5, 1, 16, 16), np.uint8))
