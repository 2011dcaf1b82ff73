"""`evaluate`: every metric beside its floor, the same numbers for the same seed, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from punkdiff.metrics.evaluation import evaluate


@pytest.fixture(scope="module")
def scored(mnist16, digit_classifier):
    samples = mnist16.heldout[-300:]  # real digits the model never saw: the model's score sits near the floor
    return evaluate(samples, mnist16, classifier=digit_classifier, progress=False), samples


def test_every_metric_has_a_floor_and_real_digits_score_near_it(scored):
    result, _ = scored
    assert result.num_images == 300 and result.feature_space.startswith("label classifier")
    for name in ("swd", "fd_classifier", "kid_classifier", "precision", "recall", "density", "coverage",
                 "class_entropy", "class_tv_distance", "confident_share", "near_copy_share_pixels"):
        assert set(result.metrics[name]) == {"model", "floor", "better"}
    m = result.metrics
    assert m["fd_classifier"]["model"] < 5 * m["fd_classifier"]["floor"]
    assert m["class_entropy"]["model"] > 0.98 and m["near_copy_share_pixels"]["model"] < 0.02
    assert len(result.histograms["model"]) == 10 and abs(sum(result.histograms["heldout_true"]) - 1) < 1e-9


def test_metrics_without_weights_are_listed_as_not_computed(scored):
    result, _ = scored
    for name in ("fid", "kid_inception", "inception_score", "fd_dinov2"):
        assert result.not_computed[name] == "not computed: weights unavailable" and name not in result.metrics


def test_same_seed_same_numbers(scored, mnist16, digit_classifier):
    result, samples = scored
    again = evaluate(samples, mnist16, classifier=digit_classifier, progress=False)
    assert again.metrics == result.metrics


def test_wrong_resolution_is_refused(mnist16):
    with pytest.raises(ValueError, match="resize them to the model's resolution"):
        evaluate(np.zeros((20, 1, 28, 28), np.uint8), mnist16, classifier=None)
