"""Precision/recall and density/coverage in the digit classifier's features, on real MNIST digits."""

from __future__ import annotations

import numpy as np
from images import blurred, noise_like

from punkdiff.metrics.precision_recall import kth_neighbour_radii, precision_recall


def test_real_vs_real_covers_noise_and_collapse_do_not(mnist16, digit_classifier):
    features = lambda images: digit_classifier.predict(images)["features"]  # noqa: E731
    real, heldout = features(mnist16.train[::5]), features(mnist16.heldout[:1000])
    floor = precision_recall(real, heldout)
    assert min(floor.values()) > 0.8
    noise = precision_recall(real, features(noise_like(mnist16.heldout[:1000])))
    assert noise["precision"] < 0.1 and noise["coverage"] < 0.1
    blur = precision_recall(real, features(blurred(mnist16.heldout[:1000])))
    assert blur["precision"] < floor["precision"] - 0.15 and blur["density"] < floor["density"] / 2
    assert blur["recall"] < 0.1 and blur["coverage"] < floor["coverage"] / 5
    # mode collapse: every sample one of ten digits; realistic (precision) but covering nothing (recall)
    collapsed = precision_recall(real, np.repeat(heldout[:10], 100, axis=0) + 1e-9)
    assert collapsed["recall"] < 0.1 < 0.5 < collapsed["precision"]
    assert collapsed["coverage"] < floor["coverage"] / 5


def test_kth_neighbour_excludes_the_point_itself():
    points = np.array([[0.0], [1.0], [3.0], [7.0]])
    import torch

    radii = kth_neighbour_radii(torch.as_tensor(points), k=1)
    assert radii.tolist() == [1.0, 1.0, 2.0, 4.0]
