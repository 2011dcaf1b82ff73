"""Shared fixtures: the offline dataset mirrors in ../shared/datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("PUNKDIFF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models, which run fastest on one thread; CI has only 2 cores to share."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One decoded-image cache for the tiny training runs of every test module (each slice is decoded once)."""
    return tmp_path_factory.mktemp("image-cache")


@pytest.fixture
def small_disk(tmp_path):
    """`small_disk(kib)`: a real file system of that size (a tmpfs mounted in tmp_path), so a write fills it as a
    full disk does; skipped, with the reason, where mounting is not allowed (not root, or a container without it)."""
    import subprocess

    mounted = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"disk-{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill ({done.stderr.strip() or 'mount failed'})")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; each in-process training run starts from a clean slate."""
    from tiny_training import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()


def _mirror(name: str) -> Path:
    """The dataset mirror's folder; without it the test skips, or fails where PUNKDIFF_REQUIRE_DATASETS=1 (CI)."""
    path = SHARED_DATASETS / name
    if not path.is_dir():
        message = f"dataset mirror {path} is absent (set PUNKDIFF_SHARED_DATASETS to its folder)"
        if os.environ.get("PUNKDIFF_REQUIRE_DATASETS") == "1":
            pytest.fail(f"{message}, and PUNKDIFF_REQUIRE_DATASETS=1 says this run must have it", pytrace=False)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    return _mirror("mnist")


@pytest.fixture(scope="session")
def punks_dir() -> Path:
    return _mirror("cryptopunks")


@pytest.fixture(scope="session")
def celeba_dir() -> Path:
    return _mirror("celeba-faces")


# ---- Evaluation: real reference sets and the classifiers trained on them, built once per test session ----------


@pytest.fixture(scope="session")
def metrics_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh punkdiff cache (decoded images, classifiers) for the session: tests never read a user's cache."""
    return tmp_path_factory.mktemp("punkdiff-cache")


@pytest.fixture(scope="session")
def mnist16(mnist_dir, metrics_cache):
    """MNIST as `mnist-baseline-16` sees it (16 px, bilinear): the 5,000 train digits and the 10,000 test digits."""
    from punkdiff.data import ImageTransform
    from punkdiff.metrics.real_images import load_reference

    return load_reference(mnist_dir, ImageTransform(16, 1, resize_filter="bilinear"), cache_dir=metrics_cache,
                          progress=False)


@pytest.fixture(scope="session")
def digit_classifier(mnist16, metrics_cache):
    from punkdiff.metrics.classifiers import load_or_train_classifier

    return load_or_train_classifier(mnist16, cache_dir=metrics_cache, progress=False)


@pytest.fixture(scope="session")
def punks24(punks_dir, metrics_cache):
    """The first 2,000 punks at 24 px on their blue-grey background, halved at random into train and held out."""
    from punkdiff.data import ImageTransform
    from punkdiff.metrics.real_images import load_reference

    transform = ImageTransform(24, 3, background="#638596", resize_filter="nearest")
    return load_reference(punks_dir, transform, max_images=2000, cache_dir=metrics_cache, progress=False)


@pytest.fixture(scope="session")
def punk_classifier(punks24, metrics_cache):
    from punkdiff.metrics.classifiers import load_or_train_classifier

    return load_or_train_classifier(punks24, cache_dir=metrics_cache, progress=False)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory) -> Path:
    """A randomly initialised FID Inception as safetensors (real weights cannot be downloaded here)."""
    from tiny_models import random_inception_weights

    return random_inception_weights(tmp_path_factory.mktemp("inception") / "inception-fid.safetensors")


@pytest.fixture(scope="session")
def dinov2_folder(tmp_path_factory) -> Path:
    """A tiny randomly initialised DINOv2 folder (config.json + model.safetensors)."""
    from tiny_models import tiny_dinov2

    return tiny_dinov2(tmp_path_factory.mktemp("dinov2"))


# ---- Parity report (used by tests/test_parity.py; owned by the parity suite) ----------------------------
# Each parity test records the largest |diffusers - reference| it saw; the maxima per family are printed at the
# end of the run, so `pytest -m parity -q` shows the measured numbers and not just "passed".
_PARITY_MAXIMA = pytest.StashKey[dict]()


@pytest.fixture
def parity_record(request: pytest.FixtureRequest):
    """`parity_record(family, max_abs_diff, tolerance)`: keep the family's maximum for the summary. A tolerance
    of None marks a pinned deviation, where the difference is expected."""
    maxima = request.config.stash.setdefault(_PARITY_MAXIMA, {})

    def record(family: str, diff: float, tolerance: float | None) -> None:
        worst, _, count = maxima.get(family, (0.0, tolerance, 0))
        maxima[family] = (max(worst, diff), tolerance, count + 1)
        request.node.user_properties.append(("max_abs_diff", diff))

    return record


def pytest_terminal_summary(terminalreporter, config: pytest.Config) -> None:
    maxima = config.stash.get(_PARITY_MAXIMA, {})
    if maxima:
        terminalreporter.section("parity: max |diffusers - reference| (float32)")
        for family, (worst, tolerance, count) in sorted(maxima.items(), key=lambda kv: (kv[1][1] is None, kv[0])):
            limit = "expected deviation" if tolerance is None else f"tol {tolerance:.0e}"
            terminalreporter.write_line(f"{family:<56} {worst:9.2e}  ({limit}, {count} cases)")
