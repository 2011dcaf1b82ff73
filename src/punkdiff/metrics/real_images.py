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

from punkdiff.data import BUILTIN_DATASETS, DataError, ImageTransform, load_image_dataset, load_training_images
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
    max_images: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> ReferenceData:
    """Load `split` of `source` (Hub id or local folder) and a held-out part, both preprocessed by `transform`.

    The held-out part is `heldout_split` if given, else the first of `HELDOUT_SPLITS` the dataset has, else a
    seeded random half of `split` (the other half is then `train`). `max_images` keeps only the first images of
    each split (quick runs, tests).

    Examples:
        ```py
        >>> reference = load_reference("../shared/datasets/mnist", ImageTransform(16, 1, resize_filter="bilinear"))
        >>> reference.train.shape, reference.heldout.shape, reference.description
        ((5000, 1, 16, 16), (10000, 1, 16, 16), "split 'train' vs held-out split 'test'")
        ```
    """
    train_images, train_rows = _load_split(source, transform, split, max_images, cache_dir, progress)
    if heldout_split is None:
        heldout_split = next((s for s in HELDOUT_SPLITS if s != split and s in _split_names(source)), None)
    if heldout_split is not None:
        heldout_images, heldout_rows = _load_split(source, transform, heldout_split, max_images, cache_dir, progress)
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


def _load_split(source, transform: ImageTransform, split: str, max_images: int | None, cache_dir, progress: bool):
    """(uint8 images, the dataset without its image column) for one split, decoded once and cached."""
    spec = DataSpec(dataset=str(source), split=split, max_samples=max_images, **asdict(transform))
    images = load_training_images(source, spec, cache_dir=cache_dir, progress=progress).images.numpy()
    rows, column = load_image_dataset(source, split)
    return images, rows.remove_columns(column).select(range(len(images)))


def _split_names(source) -> list[str]:
    import datasets

    if str(source) in BUILTIN_DATASETS:  # built in (the demo's digits): one split, no Hub to ask
        return ["train"]
    try:
        return list(datasets.get_dataset_split_names(str(source)))
    except Exception as err:  # datasets raises many types for an unknown or offline source
        raise DataError(f"could not list the splits of {str(source)!r}: {err}") from err


def model_transform(
    resolution: int, channels: int, *, preset: str | None = None, model_dir: str | Path | None = None
) -> tuple[ImageTransform, str]:
    """The preprocessing a model was trained with, at its resolution, and where it was read from.

    From the named `preset`, else from the `training_summary.json` a training run leaves beside its exported
    `pipeline/` folder, else punkdiff's defaults (white background, bicubic resize).
    """
    from punkdiff.presets import get_preset

    data, origin = None, "defaults (no --preset, no training_summary.json beside the model)"
    summary = _run_summary(model_dir) if model_dir is not None and preset is None else None
    if preset is not None:
        data, origin = asdict(get_preset(preset).data), f"preset {preset!r}"
    elif summary is not None:
        data, origin = summary[1]["config"]["data"], str(summary[0])
    keep = ("background", "resize_filter", "center_crop")
    options = {k: data[k] for k in keep} if data else {}
    return ImageTransform(resolution, channels, **options), origin


def read_images(path: str | Path, transform: ImageTransform) -> np.ndarray:
    """Images to score, as uint8 `[N, C, H, W]`: a folder of image files (sorted by name) or a uint8 `.npy` array
    (`[N, H, W, C]`, `[N, C, H, W]`, or `[N, H, W]` for grayscale). They must already be at the transform's
    resolution. Anything else is a `DataError` naming the file; a `.npy` is read without unpickling."""
    path = Path(path)
    if path.suffix == ".npy":
        array = _read_npy(path)
        if array.ndim == 3:  # [N, H, W]: grayscale, one channel
            array = array[:, None]
        if array.shape[-1] in (1, 3) and array.shape[1] not in (1, 3):
            array = np.moveaxis(array, -1, 1)
    elif path.is_dir():
        from PIL import Image

        files = sorted(p for p in path.iterdir() if p.suffix.lower() in Image.registered_extensions())
        if not files:
            raise DataError(f"{path} holds no image files")
        arrays = []
        for file in files:
            if not file.is_file():
                raise DataError(f"{file} is not an image file (a folder?); move it out of {path}")
            try:
                with Image.open(file) as image:
                    if image.size != (transform.resolution, transform.resolution):
                        raise DataError(f"{file} is {image.size[0]}x{image.size[1]}; samples are scored at the "
                                        f"model's {transform.resolution}x{transform.resolution}")
                    arrays.append(transform(image))
            except (OSError, ValueError, SyntaxError) as err:  # PIL: unidentified, truncated or corrupt files
                if isinstance(err, DataError):
                    raise
                raise DataError(f"{file} is not a readable image ({type(err).__name__}: {err}); replace or remove "
                                "it") from None
        array = np.stack(arrays)
    else:
        raise DataError(f"--samples {path}: give a folder of images or a .npy file")
    if array.shape[1:] != (transform.channels, transform.resolution, transform.resolution):
        raise DataError(f"{path}: images of shape {list(array.shape[1:])}, expected "
                        f"{[transform.channels, transform.resolution, transform.resolution]} (C, H, W)")
    return np.ascontiguousarray(array)


def _read_npy(path: Path) -> np.ndarray:
    """A uint8 image array from a `.npy` file, never unpickled; empty, truncated or object arrays are refused."""
    expected = "a uint8 array [N, H, W, C], [N, C, H, W] or [N, H, W], as np.save writes it"
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, EOFError, OSError) as err:  # empty, truncated, object dtype (a pickle), not a file
        raise DataError(f"{path} is not readable as {expected} ({type(err).__name__}: {err})") from None
    if not isinstance(array, np.ndarray) or array.dtype != np.uint8 or array.ndim not in (3, 4):
        shown = f"{array.dtype} {list(array.shape)}" if isinstance(array, np.ndarray) else type(array).__name__
        raise DataError(f"{path} holds {shown}; expected {expected}")
    if len(array) == 0:
        raise DataError(f"{path} holds no images (shape {list(array.shape)})")
    return array


def training_dataset(model_dir: str | Path) -> str | None:
    """The dataset the run that exported `model_dir` trained on, from its `training_summary.json` (or None)."""
    summary = _run_summary(model_dir)
    return summary[1]["config"]["data"]["dataset"] if summary else None


def _run_summary(model_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """`training_summary.json` in the model folder or beside it (a run's `pipeline/` export), parsed and checked
    for the fields read from it; a summary that is not one is a `DataError` naming the file."""
    for candidate in (Path(model_dir) / "training_summary.json", Path(model_dir).parent / "training_summary.json"):
        if candidate.is_file():
            try:
                summary = json.loads(candidate.read_text(encoding="utf-8"))
            except (ValueError, RecursionError) as err:  # bad JSON or UTF-8, or nested thousands deep
                problem = f"not valid JSON ({type(err).__name__}: {str(err)[:200]})"
            else:
                problem = _summary_problem(summary)
            if problem:
                raise DataError(f"{candidate} is {problem}; fix or delete it, or pass --preset to say how the "
                                "training images were prepared")
            return candidate, summary
    return None


def _summary_problem(summary: object) -> str | None:
    """What is wrong with a parsed training summary's `config.data` (the preprocessing read from it), or None."""
    from PIL import ImageColor

    from punkdiff.presets import RESIZE_FILTERS

    data = summary.get("config", {}).get("data") if isinstance(summary, dict) and isinstance(
        summary.get("config"), dict) else None
    if not isinstance(data, dict):
        return "not a training summary (it needs a \"config\": {\"data\": {...}} object)"
    background, resize, crop = data.get("background", "#ffffff"), data.get("resize_filter", "bicubic"), \
        data.get("center_crop", False)
    try:
        ImageColor.getrgb(background if isinstance(background, str) else "")
    except ValueError:
        return f"not usable: config.data.background {background!r} is not a colour such as '#ffffff'"
    if resize not in RESIZE_FILTERS or not isinstance(crop, bool):
        return (f"not usable: config.data.resize_filter must be one of {', '.join(RESIZE_FILTERS)} and "
                f"center_crop true or false (got {resize!r}, {crop!r})")
    if not isinstance(data.get("dataset"), (str, type(None))):
        return f"not usable: config.data.dataset must be a dataset name or path (got {data.get('dataset')!r})"
    return None
