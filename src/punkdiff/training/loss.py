"""The diffusion training loss: MSE to the target the scheduler's `prediction_type` names, min-SNR-gamma optional."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

# What the loop calls on each micro-batch: (model, noise_scheduler, x_0, eps, timesteps, snr_gamma) -> loss.
LossFn = Callable[[torch.nn.Module, DDPMScheduler, torch.Tensor, torch.Tensor, torch.Tensor, float | None],
                  torch.Tensor]


def diffusion_loss(
    model: torch.nn.Module,
    noise_scheduler: DDPMScheduler,
    clean: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    snr_gamma: float | None = None,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """MSE between the UNet output at x_t = q_sample(x_0, t, noise) and its target: epsilon, v or x_0.

    Min-SNR-gamma (Hang et al. 2023) clamps the per-timestep weight on the x_0 error at gamma, so easy, low-noise
    steps stop dominating; the weight is expressed relative to each prediction type's target. `weights` (one per
    image, mean 1 over the data, e.g. `balanced_row_weights`) weigh each image's error in the mean.

    Examples:
        ```py
        >>> x0 = torch.rand(4, 1, 16, 16) * 2 - 1
        >>> t = torch.randint(0, 1000, (4,))
        >>> loss = diffusion_loss(unet, DDPMScheduler(), x0, torch.randn_like(x0), t, snr_gamma=5.0)
        >>> loss.backward()
        ```
    """
    prediction_type = noise_scheduler.config.prediction_type
    noisy = noise_scheduler.add_noise(clean, noise, timesteps)
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean, noise, timesteps)
    else:
        target = clean
    pred = model(noisy, timesteps).sample
    if snr_gamma is None and weights is None:
        return F.mse_loss(pred.float(), target.float())
    per_image = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if weights is not None:
        per_image = per_image * weights.to(per_image)
    if snr_gamma is None:
        return per_image.mean()
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    weight = torch.clamp(snr, max=snr_gamma)
    if prediction_type == "epsilon":
        weight = weight / snr
    elif prediction_type == "v_prediction":
        weight = weight / (snr + 1)
    return (per_image * weight).mean()
