"""The reconstruction study: noise real images to t, denoise them back, and measure what survives.

As in the original MNIST project: for each t of a grid, images go through the forward process q(x_t | x_0) and
back through the pipeline's `reconstruct`; MSE and SSIM (torchmetrics) against the originals, as functions of t,
show up to which noise level the model restores the image itself rather than some other plausible image.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from punkdiff.pipelines import PunkDiffPipeline
from punkdiff.pipelines.punkdiff_pipeline import SAMPLERS
from punkdiff.seeds import image_generators


def scheduled_grid(pipe: PunkDiffPipeline, sampler: str, num_inference_steps: int, points: int) -> list[int]:
    """`points` timesteps spread over the sampler's schedule, so each is exactly a step it starts from."""
    sched = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    sched.set_timesteps(num_inference_steps)
    steps = sorted(int(t) for t in sched.timesteps)
    return sorted({steps[i] for i in np.linspace(0, len(steps) - 1, points).round().astype(int)})


def reconstruction_study(
    pipe: PunkDiffPipeline,
    images: np.ndarray,
    *,
    timesteps: Sequence[int] | None = None,
    sampler: str = "ddim",
    num_inference_steps: int = 50,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, object]:
    """MSE and SSIM (pixels in [0, 1], float64) of `reconstruct` at each t, for uint8 images `[N, C, H, W]`.

    Returns `{"t": [...], "mse": [...], "ssim": [...], "noised": [...], "reconstructed": [...]}`, the last two
    float arrays `[N, C, H, W]` in [0, 1] per t (for the figure). Image i uses a generator seeded `seed + i` at
    every t, so the same seed gives the same numbers.

    Examples:
        ```py
        >>> study = reconstruction_study(pipe, test_digits[:64], sampler="ddim", num_inference_steps=50)
        >>> study["t"][0], study["mse"][0] < study["mse"][-1]
        (0, True)
        ```
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    if timesteps is None:
        timesteps = scheduled_grid(pipe, sampler, num_inference_steps, points=8)
    original = torch.as_tensor(np.asarray(images)).double().div(255.0)
    result: dict[str, list] = {"t": [], "mse": [], "ssim": [], "noised": [], "reconstructed": []}
    for t in tqdm(list(timesteps), desc="reconstruction study", unit="t", disable=not progress):
        generators = image_generators(seed, len(original))
        out = pipe.reconstruct(original.float(), int(t), generator=generators, sampler=sampler,
                               num_inference_steps=num_inference_steps, output_type="pt").images.double().cpu()
        # the same forward noise `reconstruct` drew first from each generator, for the figure
        noise = torch.stack([torch.randn(original.shape[1:], generator=g)
                             for g in image_generators(seed, len(original))])
        noised = pipe.scheduler.add_noise(original * 2 - 1, noise.double(), torch.tensor([int(t)]))
        result["t"].append(int(t))
        result["mse"].append(float(((out - original) ** 2).mean()))
        result["ssim"].append(float(structural_similarity_index_measure(out, original, data_range=1.0)))
        result["noised"].append(((noised.clamp(-1, 1) + 1) / 2).numpy())
        result["reconstructed"].append(out.numpy())
    return result
