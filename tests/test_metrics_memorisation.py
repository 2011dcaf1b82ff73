"""Memorisation: a training image fed back as a sample is flagged; held-out real images are not."""

from __future__ import annotations

import numpy as np

from punkdiff.data import pixel_art_palette
from punkdiff.metrics.memorisation import memorisation, snap_to_palette


def test_training_digits_fed_back_are_copies_and_test_digits_are_not(mnist16, digit_classifier):
    pool = mnist16.train
    pool_features = digit_classifier.predict(pool)["features"]
    fed_back = pool[:100]
    copies = memorisation(fed_back, pool, features=(pool_features[:100], pool_features))
    assert copies["near_copy_share_pixels"] == 1.0 and copies["near_copy_share_features"] == 1.0
    np.testing.assert_array_equal(copies["nearest_index"], np.arange(100))
    held_out = mnist16.heldout[:500]
    fresh = memorisation(held_out, pool, features=(digit_classifier.predict(held_out)["features"], pool_features))
    assert fresh["near_copy_share_pixels"] < 0.02 and fresh["near_copy_share_features"] < 0.05


def test_punk_copies_survive_palette_snapping(punks24):
    pool = punks24.train
    palette = pixel_art_palette(pool, punks24.transform)
    assert palette is not None and len(palette) <= 256
    assert memorisation(pool[:50], pool, palette=palette)["exact_copy_rate"] == 1.0
    # a copy whose background is off by a shade (a sampler's rounding) is still a copy once snapped
    shaded = pool[:50].copy()
    shaded[shaded == 99] = 100
    assert memorisation(shaded, pool, palette=palette)["exact_copy_rate"] == 1.0
    assert memorisation(punks24.heldout[:200], pool, palette=palette)["exact_copy_rate"] < 0.02
    np.testing.assert_array_equal(snap_to_palette(pool[:5], palette), pool[:5])
