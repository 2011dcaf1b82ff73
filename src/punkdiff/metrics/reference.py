"""Real images to score against, at the model's resolution and with the training preprocessing.

A score only means something beside its real-vs-real floor, measured on the same pixels the model was trained
on: a 16 px MNIST model scored against 28 px digits looks 60 times worse than against the same digits at 16 px.
So the reference images go through `punkdiff.data` (the same transform and cache as training), and come in two
disjoint parts: `train`, what the model learned from, and `heldout`, real images it never saw (another split of
the dataset, e.g. MNIST's `test`, or else a seeded half of the one split, the other half being `train`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from punkdiff.data import DataError, ImageTransform, load_image_dataset, load_training_images
from punkdiff.presets import DataSpec

# a held-out split, in order of preference, when the caller names none
HELDOUT_SPLITS = ("test", "validation", "valid", "val")


@dataclass
class ReferenceData:
    """Two disjoint sets of real uint8 images `[N, C, H, W]`, with their other columns (labels, attributes).

    Attributes:
        train: The images the model was trained on (or the half of them that is not `heldout`).
        heldout: Real images the model never saw; they give every metric its floor.
        train_columns, heldout_columns: The dataset's non-image columns for the same rows, e.g. `{"label": [...]}`.
        features: The dataset's `datasets.Features` (class names of label columns).
        transform: The preprocessing both sets went through.
        description: Where the two sets came from, for the report.
        fingerprint: Identifies data and preprocessing (keys the classifier cache).
    """

    train: np.ndarray
    heldout: np.ndarray
    train_columns: dict[str, list[Any]]
    heldout_columns: dict[str, list[Any]]
    features: Any
    transform: ImageTransform
    description: str
    fingerprint: str = field(default="")


def load_reference(
    source: str | os.PathLike,
    transform: ImageTransform,
    *,
    split: str = "train",
    heldout_split: str | None = None,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ReferenceData:
    """Load `split` of `source` (Hub id or local folder) and a held-out part, both preprocessed by `transform`.

    The held-out part is `heldout_split` if given, else the first of `HELDOUT_SPLITS` the dataset has, else a
    seeded random half of `split` (the other half is then `train`).

    Examples:
        ```py
        >>> reference = load_reference("../shared/datasets/mnist", ImageTransform(16, 1, resize_filter="bilinear"))
        >>> reference.train.shape, reference.heldout.shape, reference.description
        ((5000, 1, 16, 16), (10000, 1, 16, 16), "split 'train' vs held-out split 'test'")
        ```
    """
    train_images, train_rows = _load_split(source, transform, split, cache_dir, progress)
    if heldout_split is None:
        heldout_split = next((s for s in HELDOUT_SPLITS if s != split and s in _split_names(source)), None)
    if heldout_split is not None:
        heldout_images, heldout_rows = _load_split(source, transform, heldout_split, cache_dir, progress)
        description = f"split {split!r} vs held-out split {heldout_split!r}"
        train_index, heldout_index = np.arange(len(train_images)), np.arange(len(heldout_images))
    else:
        heldout_images, heldout_rows = train_images, train_rows
        order = np.random.default_rng(seed).permutation(len(train_images))
        train_index, heldout_index = np.sort(order[len(order) // 2:]), np.sort(order[: len(order) // 2])
        description = f"split {split!r} halved at random (seed {seed}): one half vs the other, held out"
    fingerprint = hashlib.sha256(json.dumps(
        [train_rows._fingerprint, heldout_rows._fingerprint, description, asdict(transform)], sort_keys=True
    ).encode()).hexdigest()[:24]
    return ReferenceData(
        train=np.asarray(train_images[train_index]),
        heldout=np.asarray(heldout_images[heldout_index]),
        train_columns=train_rows.select(train_index).to_dict(),
        heldout_columns=heldout_rows.select(heldout_index).to_dict(),
        features=train_rows.features,
        transform=transform,
        description=description,
        fingerprint=fingerprint,
    )


def _load_split(source, transform: ImageTransform, split: str, cache_dir, progress: bool):
    """(uint8 images, the dataset without its image column) for one split, decoded once and cached."""
    spec = DataSpec(dataset=str(source), split=split, **asdict(transform))
    images = load_training_images(source, spec, cache_dir=cache_dir, progress=progress).images.numpy()
    rows, column = load_image_dataset(source, split)
    return images, rows.remove_columns(column)


def _split_names(source) -> list[str]:
    import datasets

    try:
        return list(datasets.get_dataset_split_names(str(source)))
    except Exception as err:  # datasets raises many types for an unknown or offline source
        raise DataError(f"could not list the splits of {str(source)!r}: {err}") from err
