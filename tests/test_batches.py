"""Where the loop's batches come from (`punkdiff.training.batches`): cached unless asked or too big to cache."""

from __future__ import annotations

import argparse

import pytest

from punkdiff.data import DataError
from punkdiff.presets import apply_overrides, get_preset
from punkdiff.training.batches import streaming_reason


def _args(**flags) -> argparse.Namespace:
    return argparse.Namespace(**{"streaming": False, "cache_dir": None, "cache_budget": None, "eval_every": 0,
                                 **flags})


def _preset(mnist_dir):
    return apply_overrides(get_preset("mnist-baseline-16"), {"data": {"dataset": str(mnist_dir)}}).validate()


def test_a_dataset_that_fits_the_budget_is_cached_and_one_that_does_not_streams(mnist_dir):
    preset = _preset(mnist_dir)
    assert streaming_reason(_args(cache_budget=1.0), preset) is None  # 1 GiB holds MNIST at 16 px
    reason = streaming_reason(_args(cache_budget=2**-20), preset)  # 1 KiB does not
    assert reason is not None and "more than the cache budget of 0 MiB" in reason
    assert streaming_reason(_args(streaming=True), preset) == "--streaming"


def test_eval_every_on_a_streamed_dataset_is_refused_with_the_way_out(mnist_dir):
    with pytest.raises(DataError, match="drop --eval-every, or cache the data"):
        streaming_reason(_args(streaming=True, eval_every=100), _preset(mnist_dir))
    assert streaming_reason(_args(eval_every=100, cache_budget=1.0), _preset(mnist_dir)) is None
