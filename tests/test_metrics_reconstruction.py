"""The reconstruction study: error grows with the noise level, and the same seed gives the same numbers."""

from __future__ import annotations

import numpy as np
from tiny_models import tiny_pipeline

from punkdiff.metrics.reconstruction import reconstruction_study, scheduled_grid


def test_error_grows_with_t_and_is_reproducible(mnist16):
    pipe = tiny_pipeline(channels=1, sample_size=16)
    digits = mnist16.heldout[:8]
    grid = scheduled_grid(pipe, "ddim", 10, points=4)
    assert len(grid) == 4 and grid[0] == 0 and grid[-1] == 900  # DDIM's 10 leading steps: 0, 100, ..., 900
    study = reconstruction_study(pipe, digits, timesteps=grid, num_inference_steps=10, progress=False)
    assert study["t"] == grid
    assert study["mse"][0] < 0.01 < study["mse"][-1]  # from t=0 the digit comes back; from t=900 it does not
    assert study["ssim"][0] > 0.9 > study["ssim"][-1]
    assert study["reconstructed"][0].shape == (8, 1, 16, 16)
    # the noised images are the ones `reconstruct` started from: almost the digit at t=0, noise at t=900
    assert np.abs(study["noised"][0] - digits / 255).mean() < 0.02
    again = reconstruction_study(pipe, digits, timesteps=grid, num_inference_steps=10, progress=False)
    assert again["mse"] == study["mse"] and again["ssim"] == study["ssim"]
