"""Reference images: the training preprocessing at the model's resolution, two disjoint real sets."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest

from punkdiff.data import DataError, ImageTransform, load_training_images
from punkdiff.metrics.real_images import model_transform, read_images
from punkdiff.presets import DataSpec


def test_reference_is_the_training_tensor(mnist_dir, mnist16, metrics_cache):
    spec = DataSpec(dataset=str(mnist_dir), resolution=16, channels=1, resize_filter="bilinear")
    trained_on = load_training_images(mnist_dir, spec, cache_dir=metrics_cache, progress=False).images.numpy()
    np.testing.assert_array_equal(mnist16.train, trained_on)
    assert mnist16.heldout.shape == (10_000, 1, 16, 16) and mnist16.heldout.dtype == np.uint8
    assert len(mnist16.heldout_columns["label"]) == 10_000


def test_single_split_is_halved_into_disjoint_parts(punks24):
    train_ids, heldout_ids = set(punks24.train_columns["id"]), set(punks24.heldout_columns["id"])
    assert len(train_ids) == len(heldout_ids) == 1000 and not train_ids & heldout_ids
    assert "halved" in punks24.description
    assert punks24.train.shape == (1000, 3, 24, 24)


def test_the_demos_built_in_digits_are_a_reference_offline(metrics_cache):
    """`punkdiff demo` learns the embedded scikit-learn digits: its evaluation needs them as a reference too."""
    from punkdiff.metrics.real_images import load_reference

    digits = load_reference("sklearn-digits", ImageTransform(16, 1, resize_filter="bilinear"), cache_dir=metrics_cache,
                            progress=False)
    assert len(digits.train) + len(digits.heldout) == 1797 and digits.train.shape[1:] == (1, 16, 16)
    assert sorted(set(digits.heldout_columns["label"])) == list(range(10))


def test_model_transform_reads_the_run_summary_or_the_preset(tmp_path):
    (tmp_path / "pipeline").mkdir()
    summary = {"config": {"data": {"background": "#638596", "resize_filter": "nearest", "center_crop": False}}}
    (tmp_path / "training_summary.json").write_text(json.dumps(summary))
    transform, origin = model_transform(24, 3, model_dir=tmp_path / "pipeline")
    assert transform == ImageTransform(24, 3, "#638596", "nearest", False) and "training_summary" in origin
    transform, origin = model_transform(16, 1, preset="mnist-baseline-16")
    assert transform.resize_filter == "bilinear" and origin == "preset 'mnist-baseline-16'"


def test_read_images_from_npy_and_folder(tmp_path, mnist16):
    transform = ImageTransform(16, 1, resize_filter="bilinear")
    hwc = np.moveaxis(mnist16.heldout[:5], 1, -1)
    np.save(tmp_path / "s.npy", hwc)
    np.testing.assert_array_equal(read_images(tmp_path / "s.npy", transform), mnist16.heldout[:5])
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(hwc):
        PIL.Image.fromarray(a[..., 0]).save(folder / f"{i:04d}.png")
    np.testing.assert_array_equal(read_images(folder, transform), mnist16.heldout[:5])
    PIL.Image.new("L", (28, 28)).save(folder / "9999.png")
    with pytest.raises(DataError, match="28x28.*16x16"):
        read_images(folder, transform)
