"""Many images from a pipeline, in batches, with image i the same whatever the batch size or the image count."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig
from punkdiff.presets import RECOMMENDED_SAMPLING
from punkdiff.seeds import image_generators


def recommended_sampling(pipe: PunkDiffPipeline) -> SamplingConfig:
    """How `pipe` is meant to be sampled: its model's `sampling.json`, else punkdiff's `RECOMMENDED_SAMPLING`.

    Examples:
        ```py
        >>> recommended_sampling(pipe).fill(None, None, None)  # what `punkdiff sample MODEL` runs
        ('ddim', 50, 1.0)
        ```
    """
    return pipe.sampling_config or SamplingConfig.from_dict(RECOMMENDED_SAMPLING)


def generate(
    pipe: PunkDiffPipeline,
    num_images: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
    eta: float | None = None,
    output_type: str = "pil",
    progress: bool = True,
    labels: int | str | Sequence[int | str | None] | None = None,
    attributes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    guidance_scale: float = 1.0,
) -> list[PIL.Image.Image] | np.ndarray:
    """`num_images` samples, `batch_size` at a time; image i comes from a CPU generator seeded `seed + i`.

    A conditional model takes `labels` or `attributes` as `PunkDiffPipeline` does: one request for every image,
    or a list with one per image, and its `guidance_scale`.

    Memory is bounded by `batch_size`, not by `num_images`, and CPU generators make the same seed give the same
    image on any device. The sampler, steps and eta left `None` are the model's recommendation
    (`recommended_sampling`).

    Examples:
        ```py
        >>> images = generate(pipe, 1000, seed=0, batch_size=250, sampler="ddim", num_inference_steps=50)
        >>> images[7] == generate(pipe, 8, seed=0, batch_size=8)[7]  # the same digit, up to float rounding
        >>> sevens = generate(digits, 100, labels=7, guidance_scale=3.0)
        ```
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be at least 1 (got {num_images}, {batch_size})")
    for request in (labels, attributes):
        if _per_image(request) and len(request) != num_images:
            raise ValueError(f"got {len(request)} requests for {num_images} images; give one per image, or one for all")
    sampler, num_inference_steps, eta = recommended_sampling(pipe).fill(sampler, num_inference_steps, eta)
    pipe.set_progress_bar_config(disable=True)
    batches = []
    for first in tqdm(range(0, num_images, batch_size), total=math.ceil(num_images / batch_size), unit="batch",
                      desc="sampling", disable=not progress):
        count = min(batch_size, num_images - first)
        generators = image_generators(seed, count, first)
        batches.append(pipe(
            batch_size=count, labels=_batch_of(labels, first, count), attributes=_batch_of(attributes, first, count),
            guidance_scale=guidance_scale, generator=generators, sampler=sampler,
            num_inference_steps=num_inference_steps, eta=eta, output_type=output_type,
        ).images)
    if output_type == "pil":
        return [image for batch in batches for image in batch]
    return np.concatenate(batches) if output_type == "np" else torch.cat(batches)


def _per_image(request: Any) -> bool:
    """Whether a request is a list with one entry per image (not one label or mapping for all of them)."""
    return request is not None and not isinstance(request, (str, int, Mapping))


def _batch_of(request: Any, first: int, count: int) -> Any:
    """A batch's part of a per-image request; one request for all images (or None) serves every batch."""
    return list(request[first:first + count]) if _per_image(request) else request
