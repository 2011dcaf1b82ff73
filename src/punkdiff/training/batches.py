"""Where the loop's batches come from: the decoded cache (built once, main process first), or a stream.

A dataset whose decoded cache would not fit the budget streams, decided from its metadata before any image is read.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from punkdiff.conditions import ConditionVocabulary, balanced_row_weights
from punkdiff.data import (
    DataError,
    ImageStreamLoader,
    ImageTensorDataset,
    ImageTransform,
    count_images,
    exceeds_cache_budget,
    load_training_conditions,
    load_training_images,
    pixel_art_palette,
    stream_training_images,
)
from punkdiff.presets import Preset
from punkdiff.training.progress import steps_per_epoch

if TYPE_CHECKING:
    from accelerate import Accelerator


@dataclass
class TrainingData:
    """The loader the loop iterates, and what else the run needs to know about its images."""

    loader: Any  # Accelerate's prepared DataLoader, or an `ImageStreamLoader`
    num_images: int | None
    updates_per_epoch: int
    streaming: bool
    palette: np.ndarray | None  # pixel art: the training colours that grids and the export snap to
    images: torch.Tensor | None  # the cached images (what `--eval-every` scores against); None when streamed
    vocabulary: ConditionVocabulary | None = None  # a conditional run's: batches are then dicts with "condition"


def streaming_reason(args: argparse.Namespace, preset: Preset) -> str | None:
    """Why this run streams its data (`--streaming`, or a cache over the budget), or None to cache it."""
    too_big = None if args.streaming else exceeds_cache_budget(
        preset.data.dataset, preset.data, args.cache_dir,
        None if args.cache_budget is None else int(args.cache_budget * 2**30),
    )
    if not (args.streaming or too_big is not None):
        return None
    if preset.data.condition_on:
        raise DataError(f"--condition-on keeps every image's condition beside the decoded cache, and this run would "
                        f"stream its data ({too_big or '--streaming'}): drop --streaming, or give the cache room "
                        "(--cache-dir on a larger disk, a larger --cache-budget)")
    if args.eval_every:
        raise DataError("--eval-every scores samples against the training images held in the cache, and a "
                        "streamed dataset holds none: drop --eval-every, or cache the data (no --streaming, a "
                        "larger --cache-budget)")
    return too_big or "--streaming"


def load_training_data(args: argparse.Namespace, preset: Preset, accelerator: Accelerator,
                       streaming: str | None) -> TrainingData:
    """Each process's batches: its shard of the stream, or its slice of every seeded, shuffled cached batch."""
    train_spec = preset.train
    if streaming:  # each process reads and decodes its own shard of the stream, with the cache's transform
        accelerator.print(f"streaming {preset.data.dataset}: {streaming}")
        num_images = count_images(preset.data.dataset, preset.data)
        stream = stream_training_images(preset.data.dataset, preset.data, seed=args.seed,
                                        rank=accelerator.process_index, world_size=accelerator.num_processes)
        loader = ImageStreamLoader(stream, num_images, train_spec.batch_size, accelerator.num_processes,
                                   accelerator.device)
        palette, images, vocabulary = None, None, None  # a streamed run's samples are not snapped to a palette
    else:
        # a conditional run reads its condition columns first: a column that cannot condition fails before decoding
        vocabulary, extras = None, {}
        if preset.data.condition_on:
            vocabulary, extras["condition"] = load_training_conditions(preset.data.dataset, preset.data)
        with accelerator.main_process_first():
            dataset = load_training_images(
                preset.data.dataset, preset.data, cache_dir=args.cache_dir, progress=accelerator.is_main_process
            )
        dataset, weights = condition_rows(dataset, vocabulary, extras, train_spec.balance_conditions)
        num_images = len(dataset)
        on_device = args.data_on_device == "yes" or (
            args.data_on_device == "auto" and accelerator.device.type == "cuda" and dataset.images.nbytes < 2**31
        )
        # pixel art (CryptoPunks) keeps its colours: grids and the export snap samples to the training palette
        palette = pixel_art_palette(dataset.images, ImageTransform.from_spec(preset.data))
        if on_device:
            dataset = dataset.to(accelerator.device)
        # batches are single gathers, seeded by the loader's own generator (not the global RNG, which dropout
        # uses); data in host memory feeding a GPU comes through pinned memory, copied without waiting
        loader = dataset.loader(train_spec.batch_size, args.seed, pin_memory=accelerator.device.type == "cuda",
                                weights=weights)
        loader = accelerator.prepare(loader)  # sharded: each process sees its own slice of every batch
        images = dataset.images
    updates_per_epoch = steps_per_epoch(len(loader), train_spec.gradient_accumulation_steps)
    return TrainingData(loader, num_images, updates_per_epoch, streaming is not None, palette, images, vocabulary)


def condition_rows(dataset: ImageTensorDataset, vocabulary: ConditionVocabulary | None,
                   extras: dict[str, torch.Tensor], balance: str) -> tuple[ImageTensorDataset, torch.Tensor | None]:
    """The cached images with each row's condition (and, to balance the loss, its weight) beside them, and the
    weights to draw them by (`balance="sampler"`), from `balanced_row_weights`; an unconditional dataset as it is."""
    if vocabulary is None:
        return dataset, None
    weights = None if balance == "none" else balanced_row_weights(extras["condition"], vocabulary)
    if balance == "loss":
        extras["loss_weight"] = weights
    return ImageTensorDataset(dataset.images, extras), weights if balance == "sampler" else None
