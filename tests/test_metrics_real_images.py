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


def test_a_grayscale_npy_without_a_channel_axis_is_one_channel(tmp_path, mnist16):
    """uint8 [N, H, W], the most natural grayscale array, is read as [N, 1, H, W]."""
    np.save(tmp_path / "gray.npy", mnist16.heldout[:5, 0])
    images = read_images(tmp_path / "gray.npy", ImageTransform(16, 1, resize_filter="bilinear"))
    np.testing.assert_array_equal(images, mnist16.heldout[:5])
    with pytest.raises(DataError, match=r"images of shape \[1, 16, 16\], expected \[3, 16, 16\]"):
        read_images(tmp_path / "gray.npy", ImageTransform(16, 3))


def _npy_bytes(array) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=True)
    return buffer.getvalue()


class _Marker:
    def __reduce__(self):
        return (print, ("unpickled!",))


@pytest.mark.parametrize(("content", "message"), [
    (b"", r"not readable as a uint8 array .*EOFError|not readable as a uint8 array .*ValueError"),
    (_npy_bytes(np.zeros((4, 16, 16), np.uint8))[:-100], r"not readable as a uint8 array .*ValueError"),
    (_npy_bytes(np.array([_Marker()], dtype=object)), r"not readable as a uint8 array .*allow_pickle=False"),
    (_npy_bytes(np.zeros((0, 16, 16), np.uint8)), r"holds no images \(shape \[0, 16, 16\]\)"),
    (_npy_bytes(np.zeros((4, 16, 16), np.float32)), r"holds float32 \[4, 16, 16\]; expected a uint8 array"),
    (_npy_bytes(np.zeros((4, 16), np.uint8)), r"holds uint8 \[4, 16\]; expected"),
    (b"\x93NUMPY garbage", r"not readable as a uint8 array"),
], ids=["empty", "truncated", "pickled", "no-images", "float", "2-d", "bad-header"])
def test_unreadable_npy_samples_are_refused_without_unpickling(tmp_path, capfd, content, message):
    (tmp_path / "s.npy").write_bytes(content)
    with pytest.raises(DataError, match=message) as err:
        read_images(tmp_path / "s.npy", ImageTransform(16, 1))
    assert str(tmp_path / "s.npy") in str(err.value)
    assert "unpickled!" not in capfd.readouterr().out


@pytest.mark.parametrize(("damage", "message"), [
    (lambda f: (f / "0003.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png"), r"0003.png is not a readable image"),
    (lambda f: (f / "0003.png").write_bytes((f / "0000.png").read_bytes()[:60]), r"0003.png is not a readable image"),
    (lambda f: (f / "x.png").mkdir(), r"x.png is not an image file \(a folder\?\); move it out"),
], ids=["corrupt", "truncated", "folder-named-png"])
def test_a_sample_folder_with_an_unreadable_entry_names_it(tmp_path, mnist16, damage, message):
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, a in enumerate(mnist16.heldout[:3]):
        PIL.Image.fromarray(a[0]).save(folder / f"{i:04d}.png")
    damage(folder)
    with pytest.raises(DataError, match=message):
        read_images(folder, ImageTransform(16, 1))


@pytest.mark.parametrize(("summary", "message"), [
    ("{not json", "is not valid JSON"),
    ("[" * 100_000 + "]" * 100_000, "is not valid JSON .*RecursionError"),
    ('{"config": []}', "is not a training summary"),
    ('{"config": {"data": {"background": "no-colour"}}}', "background 'no-colour' is not a colour"),
    ('{"config": {"data": {"resize_filter": "fancy"}}}', "resize_filter must be one of"),
    ('{"config": {"data": {"center_crop": "yes"}}}', "center_crop true or false"),
], ids=["bad-json", "deep", "no-data", "background", "filter", "crop"])
def test_an_invalid_training_summary_beside_a_model_is_a_clear_error(tmp_path, summary, message):
    (tmp_path / "pipeline").mkdir()
    (tmp_path / "training_summary.json").write_text(summary)
    with pytest.raises(DataError, match=f"training_summary.json .*{message}.*or pass --preset"):
        model_transform(24, 3, model_dir=tmp_path / "pipeline")
    transform, origin = model_transform(16, 1, preset="mnist-baseline-16", model_dir=tmp_path / "pipeline")
    assert origin == "preset 'mnist-baseline-16'"  # --preset says it all: the summary is not read
