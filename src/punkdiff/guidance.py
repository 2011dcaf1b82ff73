"""Classifier-free guidance (Ho & Salimans 2022): one model, asked with and without its condition, extrapolated.

With the conditional prediction `cond` and the unconditional one `uncond` (the null condition), the guided
prediction is `uncond + w * (cond - uncond)`. The paper writes it `(1 + w') cond - w' uncond`; here, as in diffusers,
`w = 1 + w'`: `w = 1` is the conditional model alone, `w = 0` the unconditional one, `w > 1` pushes samples towards
what the condition makes likelier. Linear in the prediction, so it applies to epsilon, v or sample predictions alike.

Both predictions come from one batched forward: the noisy sample twice, conditioned then null (`doubled_batch`),
split back afterwards (`split_doubled`). Torch only, so it can travel with the pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch


def check_guidance_scale(guidance_scale: float) -> float:
    """The guidance scale as a float, or a ValueError that says what is accepted."""
    try:
        scale = float(guidance_scale)
    except (TypeError, ValueError):
        raise ValueError(f"guidance scale must be a number >= 0, got {guidance_scale!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"guidance scale must be a finite number >= 0 (1 = the conditional model alone, 0 = the "
                         f"unconditional one, 2-5 = typical guidance), got {guidance_scale!r}")
    return scale


def guided_output(
    model_output_cond: torch.Tensor, model_output_uncond: torch.Tensor, guidance_scale: float
) -> torch.Tensor:
    """`uncond + w * (cond - uncond)`: the classifier-free guided prediction.

    Examples:
        ```py
        >>> guided_output(torch.tensor([3.0]), torch.tensor([1.0]), 2.0)
        tensor([5.])
        ```
    """
    scale = check_guidance_scale(guidance_scale)
    return model_output_uncond + scale * (model_output_cond - model_output_uncond)


def doubled_batch(
    sample: torch.Tensor, condition: torch.Tensor, null_condition: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(sample, sample)` and `(condition, null_condition)` stacked along the batch: one forward gives both."""
    if condition.shape != null_condition.shape or condition.shape[0] != sample.shape[0]:
        raise ValueError(f"condition {list(condition.shape)} and null condition {list(null_condition.shape)} must "
                         f"match each other and the batch of {sample.shape[0]} samples")
    return torch.cat([sample, sample]), torch.cat([condition, null_condition.to(condition.device, condition.dtype)])


def split_doubled(model_output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A doubled batch's output -> `(cond, uncond)`."""
    cond, uncond = model_output.chunk(2)
    return cond, uncond


def guided_prediction(
    unet: Callable[..., Any],
    sample: torch.Tensor,
    timestep: torch.Tensor | int,
    condition: torch.Tensor,
    null_condition: torch.Tensor,
    guidance_scale: float,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The guided prediction of a `UNet2DModel` at `timestep`, from one forward.

    `condition` is what `punkdiff.conditions` encodes (class indices or multi-hot); `encode` turns it into the
    UNet's `class_labels` (the attribute encoder; None for class indices). At `w = 1` only the conditional
    prediction is computed, at `w = 0` only the unconditional one.
    """
    scale = check_guidance_scale(guidance_scale)
    encode = encode or (lambda c: c)

    def forward(x: torch.Tensor, t: torch.Tensor | int, c: torch.Tensor) -> torch.Tensor:
        return unet(x, t, class_labels=encode(c)).sample

    if scale == 1.0:
        return forward(sample, timestep, condition)
    if scale == 0.0:
        return forward(sample, timestep, null_condition)
    samples, conditions = doubled_batch(sample, condition, null_condition)
    if torch.is_tensor(timestep) and timestep.ndim == 1 and timestep.shape[0] == sample.shape[0]:
        timestep = torch.cat([timestep, timestep])
    cond, uncond = split_doubled(forward(samples, timestep, conditions))
    return guided_output(cond, uncond, scale)
