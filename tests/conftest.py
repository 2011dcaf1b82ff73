"""Shared fixtures: the offline dataset mirrors in ../shared/datasets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("PUNKDIFF_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def _mirror(name: str) -> Path:
    path = SHARED_DATASETS / name
    if not path.is_dir():
        pytest.skip(f"dataset mirror {path} is absent (set PUNKDIFF_SHARED_DATASETS to its folder)")
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
