"""Inception and DINOv2 from local files: randomly initialised networks of the real shapes, since real weights
cannot be downloaded here. What is asserted is what random weights can show: the weights file is used, the same
input gives the same features, small grayscale images go through, and unsafe or wrong files are refused."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from tiny_models import random_inception_weights, tiny_dinov2

from punkdiff.metrics.feature_networks import (
    CONVERT_INCEPTION,
    INCEPTION_ENV,
    WeightsError,
    dinov2_features,
    inception_features,
    load_dinov2,
    load_inception,
    resolve_weights,
)


@pytest.fixture(scope="module")
def inception(inception_weights):
    return load_inception(inception_weights)


def test_inception_reads_the_weights_file_and_is_deterministic(inception, tmp_path, mnist16):
    digits = mnist16.heldout[:3]  # 16 px grayscale: repeated to RGB, upsampled to 299 inside the network
    pool, logits = inception_features(inception, digits, progress=False)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008) and pool.dtype == np.float64
    assert np.isfinite(pool).all() and pool.std() > 1e-3 and np.abs(pool[0] - pool[1]).max() > 1e-6
    again, _ = inception_features(inception, digits, batch_size=2, progress=False)
    np.testing.assert_allclose(again, pool, rtol=1e-5, atol=1e-6)  # the same images, the same features
    other = load_inception(random_inception_weights(tmp_path / "other.safetensors", seed=1))
    assert np.abs(inception_features(other, digits, progress=False)[0] - pool).max() > 1e-3


class _Payload:
    """Unpickling this creates a file: proof of whether a loader ever unpickled it."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mknod, (self.marker,)


def test_pickles_are_refused_and_never_unpickled(tmp_path):
    marker = tmp_path / "unpickled"
    payload = pickle.dumps({"Conv2d_1a_3x3.conv.weight": _Payload(marker)})
    for name in ("weights-inception.pth", "weights.bin", "disguised.safetensors"):
        (tmp_path / name).write_bytes(payload)
    with pytest.raises(WeightsError, match="never unpickles") as err:
        load_inception(tmp_path / "weights-inception.pth")
    assert CONVERT_INCEPTION in str(err.value)
    with pytest.raises(WeightsError, match="never unpickles"):
        load_inception(tmp_path / "weights.bin")
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_inception(tmp_path / "disguised.safetensors")
    folder = tmp_path / "dinov2"
    tiny_dinov2(folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(payload)
    with pytest.raises(WeightsError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_dinov2(folder)
    assert not marker.exists()


def test_wrong_tensors_and_wrong_folders_say_so(tmp_path):
    save_file({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "not-inception.safetensors")
    with pytest.raises(WeightsError, match="does not hold the FID InceptionV3 weights.*Missing key"):
        load_inception(tmp_path / "not-inception.safetensors")
    with pytest.raises(WeightsError, match="no config.json"):
        load_dinov2(tmp_path)


def test_weights_location_from_flag_or_environment(tmp_path, monkeypatch, inception_weights):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    assert resolve_weights(None, INCEPTION_ENV) is None  # absent: the metric is not computed
    monkeypatch.setenv(INCEPTION_ENV, str(inception_weights))
    assert resolve_weights(None, INCEPTION_ENV) == inception_weights
    assert resolve_weights(tmp_path, INCEPTION_ENV) == tmp_path  # the flag wins
    with pytest.raises(WeightsError, match=r"missing.safetensors \(given\) does not exist"):
        resolve_weights(tmp_path / "missing.safetensors", INCEPTION_ENV)
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "gone.safetensors"))
    with pytest.raises(WeightsError, match=r"\$PUNKDIFF_INCEPTION_WEIGHTS\) does not exist"):
        resolve_weights(None, INCEPTION_ENV)


def test_dinov2_cls_features(dinov2_folder, tmp_path, mnist16):
    model = load_dinov2(dinov2_folder)
    digits = mnist16.heldout[:4]
    features = dinov2_features(model, digits, batch_size=3, progress=False)
    assert features.shape == (4, 32) and np.isfinite(features).all() and features.std() > 1e-3
    np.testing.assert_allclose(dinov2_features(model, digits, progress=False), features, rtol=1e-5, atol=1e-6)
    other = load_dinov2(tiny_dinov2(tmp_path / "other", seed=1))
    assert np.abs(dinov2_features(other, digits, progress=False) - features).max() > 1e-3


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_weights_with_the_right_shapes_but_non_finite_values_are_refused(inception_weights, tmp_path, value):
    """Such Inception weights crashed the process in the math library (exit 139); now a WeightsError names them."""
    from safetensors.torch import load_file

    tensors = load_file(inception_weights)
    name = sorted(k for k, v in tensors.items() if v.is_floating_point())[len(tensors) // 2]
    tensors[name].view(-1)[0] = value
    save_file(tensors, tmp_path / "broken.safetensors")
    with pytest.raises(WeightsError, match=rf"broken.safetensors: tensor {name} holds NaN or infinite values") as err:
        load_inception(tmp_path / "broken.safetensors")
    assert CONVERT_INCEPTION in str(err.value)

    folder = tiny_dinov2(tmp_path / "dinov2")
    dino = load_file(folder / "model.safetensors")
    name = sorted(dino)[-1]
    dino[name].view(-1)[-1] = value
    save_file(dino, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=rf"model.safetensors: tensor {name} holds NaN or infinite values"):
        load_dinov2(folder)
