"""Datasets -> cached uint8 training tensors.

One entry point, `load_training_images`, accepts a Hub id, a local folder in Hub layout, a plain
folder of images, or an in-memory `datasets.Dataset`. Images are decoded and transformed once
(composite, crop, resize) into a uint8 tensor `[N, C, H, W]`, cached on disk as `.npy` (with an
xxh3 checksum beside it, checked on every load) and memory-mapped, so training never touches PIL.
Scaling to [-1, 1] and random flips happen per batch on the training device (`to_model_input`).

A dataset whose decoded cache would exceed the disk's budget (`exceeds_cache_budget`) streams instead:
`stream_training_images` is `datasets` streaming, sharded per process, decoded on the fly by the same
transform, and `ImageStreamLoader` batches it the way `ImageTensorDataset.loader` batches the cache.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageColor

from punkdiff.files import disk_full_message, is_disk_full
from punkdiff.presets import DataSpec

if TYPE_CHECKING:
    import datasets

    from punkdiff.conditions import ConditionVocabulary

_FILTERS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}


class DataError(ValueError):
    """A dataset that cannot be turned into training tensors; the message names the item and the fix."""


@dataclass(frozen=True)
class ImageTransform:
    """The deterministic part of preprocessing, applied once per image before caching."""

    resolution: int
    channels: int
    background: str = "#ffffff"
    resize_filter: str = "bicubic"
    center_crop: bool = False

    @classmethod
    def from_spec(cls, spec: DataSpec) -> ImageTransform:
        return cls(spec.resolution, spec.channels, spec.background, spec.resize_filter, spec.center_crop)

    def __call__(self, image: Image.Image) -> np.ndarray:
        """PIL image -> uint8 array `[C, H, W]` at the target resolution."""
        image = composite_on_background(to_8_bit(image), self.background)
        image = image.convert("L" if self.channels == 1 else "RGB")
        if self.center_crop:
            w, h = image.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            image = image.crop((left, top, left + side, top + side))
        size = (self.resolution, self.resolution)
        if image.size != size:
            image = image.resize(size, _FILTERS[self.resize_filter])
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def to_8_bit(image: Image.Image) -> Image.Image:
    """16-bit, 32-bit integer and float grayscale rescaled to 8 bits by the range their mode implies.

    PIL's own `convert("L")` clips instead: a 16-bit PNG becomes almost all white and a float image in [0, 1] all
    black. Integer images are read as 16-bit (0..65535) unless every value fits in 8 bits; float images as [0, 1]
    unless a value is above 1 (then [0, 255]); anything outside those ranges is refused, not guessed.
    """
    if image.mode not in ("I", "F") and not image.mode.startswith("I;16"):
        return image
    values = np.asarray(image).astype(np.float64)
    low, high = (values.min(), values.max()) if values.size else (0.0, 0.0)
    if image.mode == "F" and low >= 0 and high <= 1:
        scale = 255.0
    elif image.mode.startswith("I;16") or (image.mode == "I" and high > 255):
        scale = 255.0 / 65535.0
    else:
        scale = 1.0
    if not (np.isfinite(low) and np.isfinite(high) and low >= 0 and high * scale <= 255.0 + 1e-6):
        raise ValueError(
            f"{image.mode} image with values in [{low:g}, {high:g}]: expected 0..65535 (16-bit), [0, 1] or [0, 255] "
            "(float); save it as an 8-bit or 16-bit PNG"
        )
    return Image.fromarray(np.round(values * scale).astype(np.uint8), mode="L")


def composite_on_background(image: Image.Image, background: str) -> Image.Image:
    """Flatten transparency (RGBA, LA, palette with transparency) onto a solid colour.

    Converting RGBA straight to RGB would keep whatever colour the transparent pixels happen to
    store (black for CryptoPunks); compositing makes the background an explicit choice.
    """
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return image
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, ImageColor.getrgb(background) + (255,))
    return Image.alpha_composite(base, rgba).convert("RGB")


def load_image_dataset(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    split: str = "train",
    image_column: str | None = None,
) -> tuple[datasets.Dataset, str]:
    """Load `source` with `datasets` and return `(dataset, image_column)`.

    `source` is a Hub id, `"sklearn-digits"` (real digits scikit-learn ships, for offline demos),
    a local folder (Hub layout or plain images, which `datasets` infers as
    `imagefolder`), or a `datasets.Dataset` / `DatasetDict` already in memory.
    """
    import datasets

    if isinstance(source, str) and source in BUILTIN_DATASETS:
        source = BUILTIN_DATASETS[source]()
    if isinstance(source, (str, os.PathLike)):
        path = Path(source).expanduser()
        if path.exists() and not path.is_dir():
            raise DataError(f"dataset path {path} is a file; give a folder (Hub layout or images) or a Hub id")
        target = str(path) if path.is_dir() else str(source)
        try:
            # only the requested split is prepared (a Hub dataset's other splits are not downloaded)
            loaded = datasets.load_dataset(target, split=split)
        except ValueError as err:
            if "split" not in str(err).lower():
                raise
            available = ", ".join(datasets.get_dataset_split_names(target))
            raise DataError(f"dataset {_name(source)} has no split {split!r}; available splits: {available}") from err
        except (FileNotFoundError, ConnectionError) as err:  # offline, a missing folder is a Hub miss
            if path.is_dir():
                raise DataError(f"dataset folder {str(path)!r} is empty (no images or data files): {err}") from err
            raise DataError(
                f"could not find dataset {str(source)!r}: no such local folder, and not loadable from the Hub ({err})"
            ) from err
    else:
        loaded = source
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"dataset {_name(source)} has no split {split!r}; available splits: {', '.join(loaded)}")
        loaded = loaded[split]
    column = find_image_column(loaded.features, image_column, _name(source))
    if len(loaded) == 0:
        raise DataError(f"dataset {_name(source)} (split {split!r}) is empty: nothing to train on")
    return loaded, column


def _name(source) -> str:
    return repr(str(source)) if isinstance(source, (str, os.PathLike)) else "(in-memory dataset)"


def find_image_column(features, image_column: str | None = None, name: str = "dataset") -> str:
    """The requested column, or the first column whose feature type is `datasets.Image`."""
    import datasets

    if image_column is not None:
        if image_column not in features:
            raise DataError(
                f"{name} has no column {image_column!r}; columns: {', '.join(features)} "
                "(pass --image-column / data.image_column with one of these)"
            )
        feature = features[image_column]
        holds_paths = isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string", "binary")
        if not isinstance(feature, datasets.Image) and not holds_paths:
            images = [k for k, v in features.items() if isinstance(v, datasets.Image)]
            raise DataError(
                f"column {image_column!r} of {name} holds {feature!r}, not images; set data.image_column to "
                + (f"one of the image columns: {', '.join(images)}" if images else "a column of images or paths")
            )
        return image_column
    for column, feature in features.items():
        if isinstance(feature, datasets.Image):
            return column
    raise DataError(
        f"{name} has no image column (columns: {', '.join(f'{k}: {type(v).__name__}' for k, v in features.items())}); "
        "pass data.image_column naming the column that holds the images"
    )


DECODE_CHUNK = 256  # images per unit of work: small enough to bound memory, large enough to amortise IPC


def decode_images(
    dataset,
    column: str,
    transform: ImageTransform,
    progress: bool = True,
    *,
    into: str | os.PathLike | None = None,
    num_workers: int | None = None,
) -> np.ndarray:
    """Decode and transform every image once into a uint8 array `[N, C, H, W]`.

    With `into`, the array is a `.npy` file created there and each decoded chunk is written straight into its
    memory map, so memory stays at a few chunks whatever the dataset's size (200k CelebA faces at 128 px are
    10 GB on disk, not in RAM); without it (small, in-memory datasets) the array is in RAM. Chunks of
    `DECODE_CHUNK` images are decoded by `num_workers` processes (default: every core this process may use).

    Images are decoded here, not by `datasets`, so a corrupt file raises a `DataError` that names its index (and
    path when known) instead of failing deep inside an iterator or being skipped.

    Examples:
        ```py
        >>> dataset, column = load_image_dataset("sklearn-digits")
        >>> decode_images(dataset, column, ImageTransform(16, 1), progress=False).shape
        (1797, 1, 16, 16)
        ```
    """
    import datasets
    from tqdm.auto import tqdm

    raw = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    shape = (len(raw), transform.channels, transform.resolution, transform.resolution)
    if into is None:
        out, offset = np.empty(shape, dtype=np.uint8), None
    else:
        header = np.lib.format.open_memmap(into, mode="w+", dtype=np.uint8, shape=shape)
        offset = header.offset
        del header  # the chunks map their own slices: resident memory never grows with the file
        _reserve(into, offset + int(np.prod(shape)))
    starts = range(0, len(raw), DECODE_CHUNK)
    workers = min(num_workers or available_cores(), len(starts))
    bar = tqdm(total=len(raw), desc="decoding images", disable=not progress, unit="img")

    def collect(done) -> None:
        result = done.result()
        if into is None:
            out[result[0]:result[0] + len(result[1])] = result[1]
        bar.update(result if into is not None else len(result[1]))

    with _chunk_runner(workers) as submit:
        pending: collections.deque = collections.deque()
        for start in starts:
            items = raw[start:start + DECODE_CHUNK][column]
            pending.append(submit(_decode_chunk, items, start, column, transform, into, offset))
            if len(pending) > 2 * workers:  # a few chunks in flight, not the whole dataset's bytes
                collect(pending.popleft())
        while pending:
            collect(pending.popleft())
    bar.close()
    return out if into is None else np.load(into, mmap_mode="r")


def _reserve(path: str | os.PathLike, size: int) -> None:
    """Allocate the file's blocks now: a full disk is then an `OSError` here, not a SIGBUS in a memory-mapped write."""
    if not hasattr(os, "posix_fallocate"):
        return
    with open(path, "r+b") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as err:
            if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # the filesystem cannot preallocate: go on
                raise


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS reports it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _InProcess:
    """`submit` that runs at once and hands back an object with `.result()`, for one worker."""

    def __init__(self, value) -> None:
        self.value = value

    def result(self):
        return self.value


@contextlib.contextmanager
def _chunk_runner(workers: int):
    """`submit(fn, *args)`: in a process pool for several workers, else in this process."""
    if workers <= 1:
        yield lambda fn, *args: _InProcess(fn(*args))
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers, initializer=_die_with_parent, initargs=(os.getpid(),)) as pool:
        try:
            yield pool.submit
        except BaseException:  # a bad image, Ctrl-C: stop the queued chunks too
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _die_with_parent(parent: int) -> None:
    """In a decode worker: exit when the process that started it dies, even by SIGKILL (no orphan keeps decoding).

    On Linux the kernel sends SIGKILL at the parent's death (`PR_SET_PDEATHSIG`); elsewhere a worker notices at its
    next chunk, when the queue to its parent breaks.
    """
    import ctypes
    import signal
    import sys

    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the parent died before the line above took effect
        os._exit(1)


def _decode_chunk(items: list[dict], start: int, column: str, transform: ImageTransform,
                  into: str | os.PathLike | None, offset: int | None):
    """Decode `items` (rows `start`...); write them into the `.npy` at `into` and return their count, or, without
    `into`, return `(start, array)`."""
    chunk = np.empty((len(items), transform.channels, transform.resolution, transform.resolution), dtype=np.uint8)
    for i, item in enumerate(items):
        chunk[i] = _decode_one(item, f"item {start + i}", column, transform)
    if into is None:
        return start, chunk
    rows = np.memmap(into, dtype=np.uint8, mode="r+", offset=offset + start * chunk[0].nbytes, shape=chunk.shape)
    rows[:] = chunk
    rows.flush()
    del rows
    return len(items)


def _decode_one(item: dict, label: str, column: str, transform: ImageTransform) -> np.ndarray:
    where = label + (f" ({item['path']})" if item.get("path") else "")
    try:
        if item.get("bytes") is not None:
            image = Image.open(io.BytesIO(item["bytes"]))
        elif item.get("path"):
            image = Image.open(item["path"])
        else:
            raise DataError(f"{where} of column {column!r} is empty (no bytes, no path)")
        image.load()
        return transform(image)
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for a broken file
        raise DataError(
            f"{where} of column {column!r} is not a readable image ({type(err).__name__}: {err}); "
            "fix or remove it from the dataset"
        ) from err


def default_cache_dir() -> Path:
    """`$PUNKDIFF_CACHE`, else `$XDG_CACHE_HOME/punkdiff`, else `~/.cache/punkdiff`."""
    if os.environ.get("PUNKDIFF_CACHE"):
        return Path(os.environ["PUNKDIFF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "punkdiff"


def load_training_images(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
    spec: DataSpec,
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    num_workers: int | None = None,
) -> ImageTensorDataset:
    """The one entry point: dataset source + a preset's `DataSpec` -> an `ImageTensorDataset`.

    The decoded tensor is cached under `cache_dir` keyed by the dataset's fingerprint and the
    transform. Decoding (on `num_workers` processes, default every available core) writes straight
    into a memory-mapped temporary file that is renamed when complete, so memory use does not grow
    with the dataset and an interrupted run never leaves a truncated cache behind. The cache's checksum is
    written beside it and verified on every load (xxh3: 0.05-0.17 s for a 246 MB cache), so a damaged cache is rebuilt,
    never trained on. A cache folder that cannot be written is read if it already holds a good cache; otherwise
    the images are decoded into memory for this run, with a warning that says how to cache them.
    """
    dataset, column = _training_rows(source, spec)
    transform = ImageTransform.from_spec(spec)
    if not use_cache or not dataset.cache_files:  # in-memory datasets have no stable fingerprint
        array = decode_images(dataset, column, transform, progress, num_workers=num_workers)
        return ImageTensorDataset(torch.from_numpy(array))
    key = hashlib.sha256(
        json.dumps([dataset._fingerprint, column, asdict(transform)], sort_keys=True).encode()
    ).hexdigest()[:24]
    path = Path(cache_dir or default_cache_dir()) / f"images-{key}.npy"
    expected = (len(dataset), transform.channels, transform.resolution, transform.resolution)
    remove_stale_temporary_caches(path.parent)
    try:
        if path.exists() and not _usable_cache(path, expected):
            _remove_cache(path)
        if not path.exists():
            _build_cache(path, dataset, column, transform, progress, num_workers)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        warnings.warn(
            f"image cache folder {path.parent} is not writable ({err.strerror}): decoding the images into memory "
            "for this run only; pass --cache-dir (or set PUNKDIFF_CACHE) to a writable folder to decode them once",
            stacklevel=2,
        )
        return ImageTensorDataset(torch.from_numpy(decode_images(dataset, column, transform, progress,
                                                                 num_workers=num_workers)))
    # copy-on-write memory map: pages are read lazily and the file is never modified
    return ImageTensorDataset(torch.from_numpy(np.load(path, mmap_mode="c")))


def _training_rows(source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict,
                   spec: DataSpec) -> tuple[datasets.Dataset, str]:
    """The rows a run trains on, in the cache's order: the split, cut to `spec.max_samples`; and its image column."""
    dataset, column = load_image_dataset(source, spec.split, spec.image_column)
    if spec.max_samples is not None:
        if spec.max_samples <= 0:
            raise DataError(f"max_samples must be positive, got {spec.max_samples}")
        dataset = dataset.select(range(min(spec.max_samples, len(dataset))))
    return dataset, column


def load_training_conditions(
    source: str | os.PathLike | datasets.Dataset | datasets.DatasetDict, spec: DataSpec
) -> tuple[ConditionVocabulary, torch.Tensor]:
    """The vocabulary of `spec.condition_on` and every training row's condition `[N]` or `[N, width]`, in the
    order of `load_training_images`' tensor; read from the columns alone, so a column that cannot condition a
    model (`check_columns`) is refused before any image is decoded.

    Examples:
        ```py
        >>> vocabulary, rows = load_training_conditions("sklearn-digits", DataSpec(condition_on=("label",)))
        >>> vocabulary.unet_kwargs(), rows[:5].tolist()
        ({'num_class_embeds': 11}, [0, 1, 2, 3, 4])
        ```
    """
    from punkdiff.conditions import ConditionError, check_columns, vocabulary_from_columns

    dataset, _ = _training_rows(source, spec)
    columns = list(spec.condition_on)
    try:
        check_columns(dataset.features, columns)  # before reading them: an image column is never decoded here
        rows = dataset.select_columns(columns).to_dict()
        vocabulary = vocabulary_from_columns(dataset.features, rows)
        return vocabulary, vocabulary.encode(rows)
    except ConditionError as err:
        raise DataError(f"--condition-on {','.join(columns)}: {err}") from err


def _build_cache(path: Path, dataset, column: str, transform: ImageTransform, progress: bool,
                 num_workers: int | None) -> None:
    """Decode into a temporary file, checksum it, then rename the checksum and the cache into place.

    The checksum lands first: a kill between the two renames leaves a checksum without a cache (rebuilt next
    time), never a cache whose checksum is missing or stale.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}{_TMP_SUFFIX}")
    tmp_checksum = _checksum_path(tmp)
    try:
        decode_images(dataset, column, transform, progress, into=tmp, num_workers=num_workers)
        tmp_checksum.write_text(json.dumps({"xxh3_128": file_digest(tmp), "bytes": tmp.stat().st_size}))
        os.replace(tmp_checksum, _checksum_path(path))
        os.replace(tmp, path)
    except BaseException as err:  # full disk, Ctrl-C: leave neither a truncated cache nor a stray temp file
        tmp.unlink(missing_ok=True)
        tmp_checksum.unlink(missing_ok=True)
        if isinstance(err, Exception) and is_disk_full(err):
            needed = len(dataset) * transform.channels * transform.resolution ** 2
            raise DataError(
                f"{disk_full_message(path.parent, needed, 'the decoded image cache')}; the partial cache was removed. "
                "Free some space, pass --cache-dir (or set PUNKDIFF_CACHE) to a disk with room, or train with "
                "--streaming (no cache)") from err
        raise


_TMP_SUFFIX = ".tmp.npy"  # images-<key>.<pid>.tmp.npy while a process decodes into it


def remove_stale_temporary_caches(cache_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporary caches (and checksums) of decodes whose process is gone (a `kill -9`, a power cut):
    each is as large as the finished cache would be. Returns what was removed."""
    import psutil

    removed = []
    for tmp in Path(cache_dir).glob(f"images-*.*{_TMP_SUFFIX}*"):
        pid = tmp.name.split(".")[1]
        if pid.isdigit() and not psutil.pid_exists(int(pid)):
            with contextlib.suppress(OSError):  # a folder this process may only read: left for its owner
                tmp.unlink()
                removed.append(tmp)
    return removed


def _checksum_path(cache: Path) -> Path:
    return cache.with_name(cache.name + ".xxh3")


def _remove_cache(path: Path) -> None:
    path.unlink()
    _checksum_path(path).unlink(missing_ok=True)


def file_digest(path: str | os.PathLike) -> str:
    """The xxh3-128 digest of a file's bytes, hashed straight from its memory map (no copy).

    xxh3 (the hash `datasets` itself uses for fingerprints) runs at several GB/s on one core, so checking a cache
    costs a fraction of a second per GB, where SHA-256 would cost seconds; it guards against accidents (a bad
    disk, a bad copy, a stray write), not against someone who can write the cache folder.

    Examples:
        ```py
        >>> Path("empty").write_bytes(b"")
        0
        >>> file_digest("empty")
        '99aa06d3014798d86001c324468d497f'
        ```
    """
    import mmap

    import xxhash

    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:  # an empty file cannot be mapped
            return xxhash.xxh3_128(b"").hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            return xxhash.xxh3_128(mapped).hexdigest()


def _usable_cache(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether a cache file is a complete uint8 array of the expected shape whose bytes match the checksum written
    when it was built (truncated files, damaged headers and flipped bits are not)."""
    try:
        cached = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as err:
        warnings.warn(f"image cache {path} is damaged ({err}): rebuilding it", stacklevel=3)
        return False
    if cached.dtype != np.uint8 or cached.shape != shape:
        warnings.warn(f"image cache {path} holds {cached.dtype} {cached.shape}, not uint8 {shape}: rebuilding it",
                      stacklevel=3)
        return False
    del cached
    try:
        expected = json.loads(_checksum_path(path).read_text())["xxh3_128"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        warnings.warn(f"image cache {path} has no readable checksum ({type(err).__name__}: {err}; an older punkdiff "
                      "or an interrupted write): rebuilding it", stacklevel=3)
        return False
    actual = file_digest(path)
    if actual != expected:
        warnings.warn(f"image cache {path} does not match the checksum written when it was built (xxh3 {actual}, "
                      f"expected {expected}): its bytes were damaged or modified; rebuilding it", stacklevel=3)
        return False
    return True


# ---- streaming: datasets larger than the disk's cache budget -----------------------------------------------------

STREAM_SHUFFLE_BUFFER = 10_000  # encoded images held for the streamed shuffle (CelebA JPEGs: about 100 MB)


def count_images(source: str | os.PathLike, spec: DataSpec) -> int | None:
    """How many images `spec` takes from `source`, from the dataset's metadata (None where it has none).

    `datasets` knows a split's row count from a Hub dataset card or from the Parquet files' footers, so this reads
    no image.

    Examples:
        ```py
        >>> count_images("../shared/datasets/celeba-faces", get_preset("celeba-128").data)
        5000
        ```
    """
    import datasets

    if str(source) in BUILTIN_DATASETS:
        return None
    path = Path(source).expanduser()
    try:
        splits = datasets.load_dataset_builder(str(path) if path.is_dir() else str(source)).info.splits
    except Exception:  # no metadata to be had (offline, a typo, a gated repo): loading the data says why
        return None
    if not splits or spec.split not in splits or not splits[spec.split].num_examples:
        return None
    count = splits[spec.split].num_examples
    return count if spec.max_samples is None else min(count, spec.max_samples)


def exceeds_cache_budget(source: str | os.PathLike, spec: DataSpec, cache_dir: str | os.PathLike | None = None,
                         budget: int | None = None) -> str | None:
    """Why `source` should stream rather than be cached (None: cache it).

    It streams when its decoded cache would exceed `budget` bytes (default: the free space on the cache folder's
    disk, less 10 %). A dataset whose size is unknown is cached, as before.

    Examples:
        ```py
        >>> exceeds_cache_budget("../shared/datasets/celeba-faces", get_preset("celeba-128").data, budget=2**27)
        'its decoded cache would take 234 MiB, more than the cache budget of 128 MiB'
        ```
    """
    count = count_images(source, spec)
    if count is None:
        return None
    needed = count * spec.channels * spec.resolution * spec.resolution
    if budget is None:
        folder = Path(cache_dir or default_cache_dir()).expanduser()
        existing = next((p for p in [folder, *folder.parents] if p.exists()), Path("/"))
        budget = int(shutil.disk_usage(existing).free * 0.9)
    if needed <= budget:
        return None
    return (f"its decoded cache would take {needed / 2**20:,.0f} MiB, more than the cache budget of "
            f"{budget / 2**20:,.0f} MiB")


def stream_training_images(
    source: str | os.PathLike,
    spec: DataSpec,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    shuffle: bool = True,
) -> datasets.IterableDataset:
    """This process's shard of `source` as a `datasets.IterableDataset` of `{"image": uint8 [C, H, W]}`, decoded
    on the fly by the same transform as the cache, so nothing is written to disk.

    The stream is shuffled (seeded, through a buffer of `STREAM_SHUFFLE_BUFFER` encoded images; reseeded by
    `set_epoch`) before it is split between processes with `datasets.distributed.split_dataset_by_node`, so the
    shards are disjoint and together cover the data; images are decoded after the split, once, by their process.
    Without `shuffle`, item i of a one-process stream is item i of the dataset (the cache's order).

    Examples:
        ```py
        >>> stream = stream_training_images("../shared/datasets/mnist", get_preset("mnist-28").data, shuffle=False)
        >>> next(iter(stream))["image"].shape
        (1, 28, 28)
        ```
    """
    import datasets
    from datasets.distributed import split_dataset_by_node

    path = Path(source).expanduser()
    try:
        stream = datasets.load_dataset(str(path) if path.is_dir() else str(source), split=spec.split, streaming=True)
    except (FileNotFoundError, ConnectionError, ValueError) as err:
        raise DataError(f"could not stream dataset {_name(source)} (split {spec.split!r}): {err}") from err
    column = find_image_column(stream.features, spec.image_column, _name(source))
    stream = stream.select_columns([column]).cast_column(column, datasets.Image(decode=False))
    if spec.max_samples is not None:
        stream = stream.take(spec.max_samples)
    if shuffle:  # the same seed on every process, so every process cuts the same shuffled stream
        stream = stream.shuffle(seed=seed, buffer_size=STREAM_SHUFFLE_BUFFER)
    stream = split_dataset_by_node(stream, rank=rank, world_size=world_size)
    return stream.map(_decode_rows, batched=True, batch_size=DECODE_CHUNK, with_indices=True, remove_columns=[column],
                      fn_kwargs={"column": column, "transform": ImageTransform.from_spec(spec), "rank": rank})


def _decode_rows(rows: dict, indices: list[int], column: str, transform: ImageTransform, rank: int) -> dict:
    # copies: PIL's arrays are read-only, which torch warns about when the loader collates them
    return {"image": [np.array(_decode_one(item, f"streamed item {i} of process {rank}", column, transform))
                      for item, i in zip(rows[column], indices, strict=True)]}


class ImageStreamLoader:
    """Batches of uint8 images `[B, C, H, W]` from a stream: what `ImageTensorDataset.loader` is to the cache.

    An epoch is `len(self)` full batches on every process, whatever its shard holds: the images of a shard beyond
    them are dropped (as `drop_last` drops a partial batch), and a shard that runs out first (uneven shards; images
    lost on resume, below) starts over, so no process ever waits for another at a collective. `state_dict` is the
    stream's position (`datasets`' own `IterableDataset.state_dict`) and the batches done in the epoch: a resumed
    run continues after the last batch it trained on. That is exact without shuffling; with it, `datasets` does
    not save the shuffle buffer and refills it on resume, so in the interrupted epoch up to `STREAM_SHUFFLE_BUFFER`
    images come twice and as many are skipped, and the order differs from an uninterrupted run's.

    Examples:
        ```py
        >>> stream = stream_training_images("../shared/datasets/mnist", get_preset("mnist-28").data)
        >>> loader = ImageStreamLoader(stream, num_images=5000, batch_size=64)
        >>> len(loader), next(iter(loader)).shape
        (78, torch.Size([64, 1, 28, 28]))
        ```
    """

    def __init__(self, stream: datasets.IterableDataset, num_images: int | None, batch_size: int, world_size: int = 1,
                 device: torch.device | str = "cpu") -> None:
        if num_images is None:
            raise DataError("this stream's number of images is unknown (no split sizes in the dataset card or the "
                            "Parquet footers), so its epochs cannot be planned: cache it instead (drop --streaming, "
                            "raise --cache-budget)")
        self.stream, self.batch_size, self.device = stream, batch_size, torch.device(device)
        self.batches_per_epoch = num_images // (batch_size * world_size)
        self._start = stream.state_dict()  # the position before the first image, to start a shard over
        self._epoch = 0
        self._batches_done = 0
        self._resume_at = 0

    def __len__(self) -> int:
        return self.batches_per_epoch

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        self.stream.set_epoch(epoch)

    def __iter__(self):
        import itertools

        self._batches_done, self._resume_at = self._resume_at, 0
        while self._batches_done < self.batches_per_epoch:
            # one process reads and decodes: the stream's state is then exactly the batches handed out
            batches = torch.utils.data.DataLoader(self.stream, batch_size=self.batch_size, drop_last=True,
                                                  pin_memory=self.device.type == "cuda")
            before = self._batches_done
            for batch in itertools.islice(batches, self.batches_per_epoch - self._batches_done):
                self._batches_done += 1
                yield batch["image"].to(self.device, non_blocking=True)
            if self._batches_done == before:
                raise DataError(f"this process's shard of the stream holds fewer than {self.batch_size} images: "
                                "lower --batch-size or use fewer processes")
            if self._batches_done < self.batches_per_epoch:  # ran out: start the shard over
                self.stream.load_state_dict({**self._start, "epoch": self._epoch})

    def state_dict(self) -> dict:
        return {"stream": self.stream.state_dict(), "batches_done": self._batches_done}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` at the next iteration over the epoch it was saved in (a finished epoch: the next one
        starts afresh)."""
        if state["batches_done"] < self.batches_per_epoch:
            self.stream.load_state_dict(state["stream"])
            self._resume_at = state["batches_done"]


class ImageTensorDataset(torch.utils.data.Dataset):
    """Decoded uint8 images `[N, C, H, W]`; indexing is a tensor slice, so batches are cheap.

    A small dataset can be moved whole onto the training device with `.to(device)`.
    """

    def __init__(self, images: torch.Tensor, extras: dict[str, torch.Tensor] | None = None) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise DataError(f"expected a uint8 tensor [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        bad = [k for k, v in (extras or {}).items() if v.shape[0] != images.shape[0]]
        if bad:
            raise DataError(f"per-image values {bad} do not have one row per image ({images.shape[0]})")
        self.images, self.extras = images, dict(extras or {})

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> torch.Tensor | dict[str, torch.Tensor]:
        return self.__getitems__([index])[0] if self.extras else self.images[index]

    def __getitems__(self, indices: list[int]) -> list[torch.Tensor] | list[dict[str, torch.Tensor]]:
        """A whole batch as one gather; `DataLoader` calls this instead of `__getitem__` once per image.

        The rows come back as views of the gathered batch (the list `DataLoader`'s collate expects); with `extras`
        (a conditional run's conditions), each row is `{"images": image, name: value, ...}`.
        """
        index = torch.as_tensor(indices, dtype=torch.long)
        if self.images.is_cuda:  # pinned and non-blocking: indexing data on a GPU never waits for it
            index = index.pin_memory().to(self.images.device, non_blocking=True)
        images = list(self.images.index_select(0, index).unbind(0))
        if not self.extras:
            return images
        columns = {k: v.index_select(0, index.to(v.device)).unbind(0) for k, v in self.extras.items()}
        return [{"images": image, **{k: v[i] for k, v in columns.items()}} for i, image in enumerate(images)]

    def loader(self, batch_size: int, seed: int, pin_memory: bool = False,
               weights: torch.Tensor | None = None) -> torch.utils.data.DataLoader:
        """Shuffled batches, seeded, the last partial one dropped; each batch is one slice (`__getitems__`).

        `pin_memory` (for data in host memory feeding a GPU) lets the copy to the device run asynchronously.
        `weights` (one per image) draws each epoch's images with replacement in proportion to them instead
        (`EpochWeightedSampler`), as many as there are images.

        Examples:
            ```py
            >>> images = ImageTensorDataset(torch.zeros(10, 1, 8, 8, dtype=torch.uint8))
            >>> [tuple(b.shape) for b in images.loader(batch_size=4, seed=0)]
            [(4, 1, 8, 8), (4, 1, 8, 8)]
            ```
        """
        pin_memory = pin_memory and not self.images.is_cuda
        if weights is not None:
            return torch.utils.data.DataLoader(self, batch_size=batch_size, drop_last=True, pin_memory=pin_memory,
                                               sampler=EpochWeightedSampler(weights, seed))
        return torch.utils.data.DataLoader(
            self, batch_size=batch_size, shuffle=True, drop_last=True,
            generator=torch.Generator().manual_seed(seed), pin_memory=pin_memory,
        )

    def to(self, device: torch.device | str) -> ImageTensorDataset:
        return ImageTensorDataset(self.images.to(device), {k: v.to(device) for k, v in self.extras.items()})


class EpochWeightedSampler(torch.utils.data.WeightedRandomSampler):
    """`WeightedRandomSampler` (with replacement, one draw per image) whose epoch `e` is seeded `seed + e`, as
    Accelerate's seedable sampler is: a run resumed mid-epoch draws that epoch's order again and skips what it did.

    Examples:
        ```py
        >>> sampler = EpochWeightedSampler(torch.tensor([1.0, 0.0, 1.0]), seed=0)
        >>> sampler.set_epoch(3); first = list(sampler); sampler.set_epoch(3)
        >>> list(sampler) == first and 1 not in first
        True
        ```
    """

    def __init__(self, weights: torch.Tensor, seed: int) -> None:
        super().__init__(weights.double().cpu(), num_samples=len(weights), replacement=True,
                         generator=torch.Generator())
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


MAX_PALETTE = 256  # more colours than this is not pixel art


def pixel_art_palette(images: np.ndarray | torch.Tensor, transform: ImageTransform) -> np.ndarray | None:
    """The distinct colours uint8 `[P, C]` of pixel-art training images `[N, C, H, W]` (resized "nearest", at
    most `MAX_PALETTE` colours), else None. Models of pixel art snap their samples to it for display and scoring.

    Examples:
        ```py
        >>> images = np.zeros((2, 3, 4, 4), dtype=np.uint8); images[1] = 255
        >>> pixel_art_palette(images, ImageTransform(4, 3, resize_filter="nearest")).tolist()
        [[0, 0, 0], [255, 255, 255]]
        ```
    """
    if transform.resize_filter != "nearest":
        return None
    images = np.asarray(images)
    packed = np.zeros(images.shape[:1] + images.shape[2:], dtype=np.int64)
    for c in range(images.shape[1]):  # one integer per pixel, so np.unique works on a flat array
        packed = packed * 256 + images[:, c]
    codes = np.unique(packed)
    if len(codes) > MAX_PALETTE:
        return None
    shifts = 8 * np.arange(images.shape[1] - 1, -1, -1)
    return ((codes[:, None] >> shifts) & 255).astype(np.uint8)


def to_model_input(
    batch: torch.Tensor, random_flip: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """uint8 `[B, C, H, W]` -> float in [-1, 1], with an optional per-image horizontal flip."""
    x = batch.float().div_(127.5).sub_(1.0)
    if random_flip:
        flip = torch.rand(x.shape[0], generator=generator, device=generator.device if generator else "cpu") < 0.5
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(-1), x)
    return x


def sklearn_digits():
    """Real handwritten digits that scikit-learn ships (1,797 images, 8x8, 17 grey levels).

    The embedded default for `punkdiff demo`, so the main job needs no download. Each digit fills
    its 8x8 frame, so it gets a 2-pixel black border (12x12), framed like MNIST's 20-in-28.
    """
    import datasets
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)
    pixels = np.pad(pixels, ((0, 0), (2, 2), (2, 2)))
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(p, mode="L") for p in pixels], "label": digits.target.tolist()},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list("0123456789"))}),
    )


BUILTIN_DATASETS = {"sklearn-digits": sklearn_digits}
