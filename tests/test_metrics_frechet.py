"""Fréchet and kernel distances in the digit classifier's features: real vs real far below noise and blur."""

from __future__ import annotations

import numpy as np
from images import blurred, noise_like

from punkdiff.metrics.frechet import frechet_distance, kernel_distance


def test_real_vs_real_is_far_below_noise_and_blur(mnist16, digit_classifier):
    features = lambda images: digit_classifier.predict(images)["features"]  # noqa: E731
    train, heldout = features(mnist16.train[::5]), features(mnist16.heldout[:1000])
    floor = frechet_distance(train, heldout)
    assert 10 * floor < frechet_distance(train, features(blurred(mnist16.heldout[:1000])))
    assert 100 * floor < frechet_distance(train, features(noise_like(mnist16.heldout[:1000])))
    kid_floor = kernel_distance(train, heldout, subset_size=500)[0]
    assert 10 * abs(kid_floor) < kernel_distance(train, features(blurred(mnist16.heldout[:1000])), subset_size=500)[0]


def test_same_seed_same_numbers_and_float64():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(300, 16)), rng.normal(0.1, 1.0, size=(300, 16))
    assert frechet_distance(a, b) == frechet_distance(a, b)
    assert kernel_distance(a, b, subset_size=100, seed=3) == kernel_distance(a, b, subset_size=100, seed=3)
    assert kernel_distance(a, b, subset_size=100, seed=3) != kernel_distance(a, b, subset_size=100, seed=4)
    # float64 throughout: a shift of 1e-6 in one coordinate moves the distance by its square, 1e-12
    shifted = a + np.eye(16)[0] * 1e-6
    assert abs(frechet_distance(a, shifted) - 1e-12) < 1e-13


def test_rejects_mismatched_features():
    import pytest

    with pytest.raises(ValueError, match="same D"):
        frechet_distance(np.zeros((10, 3)), np.zeros((10, 4)))
