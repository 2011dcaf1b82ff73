"""Many images from a pipeline, in batches, with image i the same whatever the batch size or the image count.

The inference settings live here, so every face samples alike:

- the loop runs under `torch.inference_mode` (no autograd bookkeeping);
- `precision="auto"` computes the UNet under bf16 autocast on a CPU that multiplies bf16 natively (AVX-512 BF16 or
  AMX, the check training uses: `punkdiff.precision`) and in float32 elsewhere, where emulated bf16 is far slower;
  the sampler's own arithmetic stays float32 (`sampling_precision` says which was used);
- `prepare_for_sampling` stores the UNet channels-last and compiles it (`torch.compile`), both opt-in;
- `write_pngs` encodes PNGs in a thread pool (Pillow's encoder releases the GIL), and `write_array` writes one
  uint8 `.npy` that `punkdiff eval --samples` scores.

Images/s per setting: `benchmarks/bench_inference.py`.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from tqdm.auto import tqdm

from punkdiff.files import atomic_path
from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import SamplingConfig
from punkdiff.precision import SAMPLING_PRECISIONS, cpu_has_native_bf16
from punkdiff.presets import RECOMMENDED_SAMPLING
from punkdiff.seeds import image_generators

# Images per forward pass by default: large enough that the sampler's per-step Python is a small share of a step on
# a CPU, small enough for a 64 px model's activations to stay a few hundred MB.
SAMPLE_BATCH_SIZE = 64


def recommended_sampling(pipe: PunkDiffPipeline) -> SamplingConfig:
    """How `pipe` is meant to be sampled: its model's `sampling.json`, else punkdiff's `RECOMMENDED_SAMPLING`.

    Examples:
        ```py
        >>> recommended_sampling(pipe).fill(None, None, None)  # what `punkdiff sample MODEL` runs
        ('ddim', 50, 1.0)
        ```
    """
    return pipe.sampling_config or SamplingConfig.from_dict(RECOMMENDED_SAMPLING)


def sampling_precision(pipe: PunkDiffPipeline, precision: str = "auto") -> tuple[str, str]:
    """`(what the UNet computes in, why)`: `"bfloat16"` (bf16 autocast over float32 weights), or the weights' dtype.

    `"auto"` is bf16 autocast on a CPU with native bf16 and the weights' own dtype elsewhere; `"bfloat16"` asked of a
    CPU without native bf16 also falls back to float32, which is faster there. Weights already loaded in a half
    precision (`load_pipeline(dtype=...)`, `--dtype`) compute in it whatever is asked.

    Examples:
        ```py
        >>> sampling_precision(pipe, "float32")
        ('float32', 'asked for')
        >>> sampling_precision(pipe)  # on a CPU with AMX
        ('bfloat16', 'bf16 autocast: this CPU has native bf16 (AVX-512 BF16 or AMX)')
        ```
    """
    if precision not in SAMPLING_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(SAMPLING_PRECISIONS)}, got {precision!r}")
    weights = str(pipe.unet.dtype).removeprefix("torch.")
    if pipe.unet.dtype != torch.float32:
        return weights, f"the weights are {weights}"
    if precision == "float32":
        return "float32", "asked for"
    device = pipe._execution_device
    if device.type != "cpu":
        if precision == "bfloat16":
            return "bfloat16", "bf16 autocast, asked for"
        return "float32", f"the default on {device.type} (load the weights in a half precision for speed there)"
    if cpu_has_native_bf16():
        return "bfloat16", "bf16 autocast: this CPU has native bf16 (AVX-512 BF16 or AMX)"
    return "float32", "this CPU has no native bf16 (AVX-512 BF16 or AMX), where bf16 is slower than float32"


def prepare_for_sampling(
    pipe: PunkDiffPipeline, *, channels_last: bool = False, compile: bool = False
) -> PunkDiffPipeline:
    """`pipe` with its UNet stored channels-last and/or compiled (`torch.compile`, inductor), in place.

    The UNet keeps its class and its weights' names, so the pipeline still saves and samples as before; compiling
    costs seconds to a minute on the first batch (and once more for a smaller last batch), so it pays off on
    thousands of images, not on a grid.

    Examples:
        ```py
        >>> pipe = prepare_for_sampling(PunkDiffPipeline.from_pretrained("outputs/mnist16/pipeline"), compile=True)
        >>> images = generate(pipe, 10_000, precision="auto")
        ```
    """
    if channels_last:
        pipe.unet.to(memory_format=torch.channels_last)
    if compile:
        pipe.unet.compile()  # nn.Module.compile: the module stays a UNet2DModel, only its call is compiled
    return pipe


def generate(
    pipe: PunkDiffPipeline,
    num_images: int,
    *,
    seed: int = 0,
    batch_size: int = SAMPLE_BATCH_SIZE,
    sampler: str | None = None,
    num_inference_steps: int | None = None,
    eta: float | None = None,
    output_type: str = "pil",
    progress: bool = True,
    labels: int | str | Sequence[int | str | None] | None = None,
    attributes: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None,
    guidance_scale: float = 1.0,
    precision: str = "float32",
) -> list[PIL.Image.Image] | np.ndarray:
    """`num_images` samples, `batch_size` at a time; image i comes from a CPU generator seeded `seed + i`.

    A conditional model takes `labels` or `attributes` as `PunkDiffPipeline` does: one request for every image,
    or a list with one per image, and its `guidance_scale`.

    Memory is bounded by `batch_size`, not by `num_images`, and CPU generators make the same seed give the same
    image on any device. The sampler, steps and eta left `None` are the model's recommendation
    (`recommended_sampling`). `precision` is `sampling_precision`'s: `"auto"` (bf16 autocast on a CPU with native
    bf16) is the fastest, and `"float32"`, the default, gives the same images on every machine.

    Examples:
        ```py
        >>> images = generate(pipe, 1000, seed=0, batch_size=250, sampler="ddim", num_inference_steps=50)
        >>> images[7] == generate(pipe, 8, seed=0, batch_size=8)[7]  # the same digit, up to float rounding
        >>> sevens = generate(digits, 100, labels=7, guidance_scale=3.0)
        >>> fast = generate(pipe, 10_000, precision="auto")  # bf16 autocast where the CPU has it
        ```
    """
    if num_images < 1 or batch_size < 1:
        raise ValueError(f"num_images and batch_size must be at least 1 (got {num_images}, {batch_size})")
    for request in (labels, attributes):
        if _per_image(request) and len(request) != num_images:
            raise ValueError(f"got {len(request)} requests for {num_images} images; give one per image, or one for all")
    sampler, num_inference_steps, eta = recommended_sampling(pipe).fill(sampler, num_inference_steps, eta)
    computed_in, _ = sampling_precision(pipe, precision)
    pipe.set_progress_bar_config(disable=True)
    batches = []
    with torch.inference_mode(), _autocast(pipe, computed_in):
        for first in tqdm(range(0, num_images, batch_size), total=math.ceil(num_images / batch_size), unit="batch",
                          desc="sampling", disable=not progress):
            count = min(batch_size, num_images - first)
            generators = image_generators(seed, count, first)
            batches.append(pipe(
                batch_size=count, labels=_batch_of(labels, first, count),
                attributes=_batch_of(attributes, first, count), guidance_scale=guidance_scale, generator=generators,
                sampler=sampler, num_inference_steps=num_inference_steps, eta=eta, output_type=output_type,
            ).images)
    if output_type == "pil":
        return [image for batch in batches for image in batch]
    return np.concatenate(batches) if output_type == "np" else torch.cat(batches)


def to_uint8(images: np.ndarray) -> np.ndarray:
    """`generate(..., output_type="np")`'s floats `[N, H, W, C]` in [0, 1] -> uint8 `[N, C, H, W]`, the layout
    `punkdiff eval` saves its samples in and reads back with `--samples`."""
    return (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)


def write_array(images: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """uint8 `[N, C, H, W]` images -> one `.npy` (atomic; no pickle), which `punkdiff eval --samples` scores."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, images, allow_pickle=False)
    return path


def write_pngs(
    images: Sequence[PIL.Image.Image], folder: str | os.PathLike[str], *, workers: int | None = None
) -> Path:
    """Image i -> `folder/NNNN.png` (i zero-padded to 4 digits), encoded in a pool of `workers` threads.

    Pillow releases the GIL while it compresses, so on a CPU the PNGs of 10,000 small images are written in the time
    it takes to sample a fraction of them.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for done in [pool.submit(image.save, folder / f"{i:04d}.png") for i, image in enumerate(images)]:
            done.result()
    return folder


@contextlib.contextmanager
def _autocast(pipe: PunkDiffPipeline, computed_in: str) -> Iterator[None]:
    """bf16 autocast on the pipeline's device when `computed_in` says so over float32 weights; else nothing."""
    on = computed_in == "bfloat16" and pipe.unet.dtype == torch.float32
    with torch.autocast(pipe._execution_device.type, dtype=torch.bfloat16, enabled=on):
        yield


def _per_image(request: Any) -> bool:
    """Whether a request is a list with one entry per image (not one label or mapping for all of them)."""
    return request is not None and not isinstance(request, (str, int, Mapping))


def _batch_of(request: Any, first: int, count: int) -> Any:
    """A batch's part of a per-image request; one request for all images (or None) serves every batch."""
    return list(request[first:first + count]) if _per_image(request) else request
