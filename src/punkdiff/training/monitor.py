"""`--eval-every`: a cheap offline quality number during training, from the EMA weights, beside its floor.

The loss says little about sample quality; a full evaluation (`punkdiff eval`) is too slow to run often. This
samples a small set with the preview settings and scores it with the multi-scale sliced Wasserstein distance
against training images, which needs no classifier and no download. Its floor, one random half of those training
images against the other, is measured once at the start, so the logged curve can be read against it.
"""

from __future__ import annotations

import contextlib
import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from punkdiff.metrics.swd import sliced_wasserstein_distance
from punkdiff.training.ema import averaged_weights

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.training_utils import EMAModel

    from punkdiff.training.conditioning import TrainingCondition


class QualityMonitor:
    """SWD of `num_images` EMA samples against as many training images, with the real-vs-real floor.

    Examples:
        ```py
        >>> monitor = QualityMonitor(dataset.images, num_images=200, seed=0)
        >>> monitor(unet, ema, noise_scheduler, num_inference_steps=50, step=500)
        {'eval_swd': 41.2, 'eval_swd_floor': 12.9, 'eval_seconds': 9.8}
        ```
    """

    def __init__(self, images: torch.Tensor, num_images: int = 200, seed: int = 0,
                 condition: TrainingCondition | None = None) -> None:
        if len(images) < 2 * num_images:
            raise ValueError(f"--eval-images {num_images} needs at least {2 * num_images} training images (the "
                             f"floor compares two disjoint sets), the dataset has {len(images)}")
        rows = np.random.default_rng(seed).permutation(len(images))[: 2 * num_images]
        picked = images[torch.as_tensor(np.sort(rows))].cpu().numpy()
        self.reference, other = picked[:num_images], picked[num_images:]
        self.num_images, self.seed, self.condition = num_images, seed, condition
        self.floor = sliced_wasserstein_distance(self.reference, other, seed=seed)["swd"]
        self.history: list[list[float]] = []
        self.seconds = 0.0

    def __call__(
        self, unet: UNet2DModel, ema: EMAModel | None, noise_scheduler: DDPMScheduler, num_inference_steps: int,
        step: int,
    ) -> dict[str, float]:
        """Sample with the EMA weights (DDIM, seeds `seed + i`), score, and remember the result for the summary.

        A conditional model samples its null condition, unguided: the unconditional model it also learns."""
        from punkdiff.pipelines import PunkDiffPipeline
        from punkdiff.sampling import generate

        start = time.perf_counter()
        with averaged_weights(unet, ema) as averaged, (
                self.condition.averaged() if self.condition is not None else contextlib.nullcontext({})) as conditioned:
            pipe = PunkDiffPipeline(unet=averaged, scheduler=noise_scheduler, **conditioned)
            images = generate(pipe, self.num_images, seed=self.seed, batch_size=100, sampler="ddim",
                              num_inference_steps=num_inference_steps, output_type="np", progress=False)
        samples = (images * 255).round().astype(np.uint8).transpose(0, 3, 1, 2)
        swd = sliced_wasserstein_distance(self.reference, samples, seed=self.seed)["swd"]
        seconds = time.perf_counter() - start
        self.seconds += seconds
        self.history.append([step, swd])
        return {"eval_swd": swd, "eval_swd_floor": self.floor, "eval_seconds": seconds}

    def summary(self, wall_time_s: float) -> dict[str, object]:
        """For `training_summary.json`: the curve, the floor, and the share of the run's wall time it took."""
        return {
            "metric": f"multi-scale SWD x1e3, {self.num_images} EMA samples vs as many training images",
            "floor": self.floor,
            "history": self.history,
            "seconds": round(self.seconds, 2),
            "share_of_wall_time": round(self.seconds / wall_time_s, 4) if wall_time_s > 0 else None,
        }

    def card_metrics(self) -> dict[str, float]:
        """The last score and its floor, for the model card (table and YAML `model-index`)."""
        name = f"SWD x1e3 ({self.num_images} EMA samples vs training images)"
        return {name: self.history[-1][1], f"{name}, real-vs-real floor": self.floor} if self.history else {}
