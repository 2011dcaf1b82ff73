"""From-scratch reference for the diffusion math the pipeline relies on, in pure PyTorch.

This module is an independent oracle for the parity suite: it imports torch only (never diffusers, never
punkdiff), so a bug shared with the library under test cannot hide here. Every function is written from the
papers, not from any library's code:

- Ho et al. 2020, "Denoising Diffusion Probabilistic Models" (DDPM), arXiv:2006.11239.
- Song et al. 2021, "Denoising Diffusion Implicit Models" (DDIM), arXiv:2010.02502.
- Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models", arXiv:2102.09672.
- Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models" (v), arXiv:2202.00512.
- Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed" (spacings), arXiv:2305.08891.
- Ho & Salimans 2022, "Classifier-Free Diffusion Guidance", arXiv:2207.12598.

Conventions. Timesteps are 0-indexed, t = 0 .. T-1 (the papers' t = 1 .. T). A sampler visits a decreasing
sequence of timesteps; each step goes from t to the next one, t_prev, and the last step has t_prev = -1 with
alpha_bar(-1) := 1 (x_0 is clean). For a strided step the per-step beta is beta_{t|t_prev} = 1 - alpha_bar_t /
alpha_bar_{t_prev} (Nichol & Dhariwal 2021, sec. 4), which reduces to beta_t when t_prev = t - 1. Schedules are
computed in float64 unless asked otherwise; samples keep the dtype of the tensors passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from typing import Literal

import torch

Schedule = Literal["linear", "scaled_linear", "quadratic", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "sample", "v_prediction"]
VarianceType = Literal["fixed_small", "fixed_large", "learned", "learned_range"]
Spacing = Literal["leading", "trailing", "linspace"]
Generator = torch.Generator | list[torch.Generator] | None
Model = Callable[[torch.Tensor, int], torch.Tensor]
ConditionalModel = Callable[[torch.Tensor, int, torch.Tensor], torch.Tensor]

__all__ = [
    "alpha_bar",
    "alphas_cumprod",
    "ddim_sample",
    "ddim_sigma",
    "ddim_step",
    "ddpm_sample",
    "ddpm_step",
    "ddpm_variance",
    "dynamic_threshold",
    "guided_model",
    "guided_output",
    "make_betas",
    "posterior_mean_variance",
    "posterior_variance",
    "predict_epsilon",
    "predict_x0",
    "q_sample",
    "randn",
    "spaced_timesteps",
    "step_beta",
]


# --------------------------------------------------------------------------------------------------------------
# Schedules
# --------------------------------------------------------------------------------------------------------------


def make_betas(
    schedule: Schedule,
    num_train_timesteps: int = 1000,
    beta_start: float = 1e-4,
    beta_end: float = 0.02,
    max_beta: float = 0.999,
) -> torch.Tensor:
    """The forward-process variances beta_1..beta_T (float64).

    - "linear": Ho et al. 2020, sec. 4 (beta_1 = 1e-4 to beta_T = 0.02, linearly).
    - "quadratic": the original DDPM code's "quad" schedule, beta_t = (linspace of sqrt(beta))^2.
    - "scaled_linear": diffusers' name for that same schedule; computed here as its own definition so that the
      two can be checked against each other.
    - "squaredcos_cap_v2": Nichol & Dhariwal 2021, eq. 17, alpha_bar(t) = f(t) / f(0) with
      f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2), s = 0.008, and beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}
      clipped to `max_beta` (0.999 in the paper) to avoid the singularity at t = T.
    """
    T = num_train_timesteps
    if schedule == "linear":
        return torch.tensor(
            [beta_start + (beta_end - beta_start) * i / max(T - 1, 1) for i in range(T)], dtype=torch.float64
        )
    if schedule == "quadratic":
        r0, r1 = math.sqrt(beta_start), math.sqrt(beta_end)
        return torch.tensor([(r0 + (r1 - r0) * i / max(T - 1, 1)) ** 2 for i in range(T)], dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "squaredcos_cap_v2":
        s = 0.008

        def f(u: float) -> float:
            return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

        return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)], dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {schedule!r}")


def alphas_cumprod(betas: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s) (Ho et al. 2020, notation above eq. 4).

    float64 by default. `dtype=torch.float32` reproduces the rounding of a pipeline that stores the schedule in
    float32 (diffusers does): there 1 - alpha_bar_t cancels catastrophically at small t, which is a precision
    effect, not a difference in the math, and the parity suite measures it separately.
    """
    return torch.cumprod(1.0 - betas.to(dtype), dim=0)


def alpha_bar(ac: torch.Tensor, t: int) -> torch.Tensor:
    """alpha_bar_t, with alpha_bar_{-1} := 1 so that the last step of a sampler lands on clean data."""
    return ac[t] if t >= 0 else torch.ones((), dtype=ac.dtype)


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: Spacing, steps_offset: int = 0
) -> list[int]:
    """The decreasing timesteps a sampler visits (Lin et al. 2024, Table 2), in exact integer arithmetic.

    - "leading": t_i = i * floor(T / n) + steps_offset (the DDIM paper's uniform stride).
    - "trailing": t_i = round(T * (n - i) / n) - 1, so the first step is always T - 1.
    - "linspace": t_i = round(i * (T - 1) / (n - 1)), so the chain starts at T - 1 and ends at 0.
    Rounding is half-to-even on the exact rational value, and exactly n timesteps are returned.
    """
    T, n = num_train_timesteps, num_inference_steps
    if not 1 <= n <= T:
        raise ValueError(f"num_inference_steps must be in [1, {T}], got {n}")
    if spacing == "leading":
        steps = [i * (T // n) + steps_offset for i in range(n)]
    elif spacing == "trailing":
        steps = [round(Fraction(T * k, n)) - 1 for k in range(1, n + 1)]
    elif spacing == "linspace":
        steps = [0] if n == 1 else [round(Fraction(i * (T - 1), n - 1)) for i in range(n)]
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    if steps[-1] > T - 1:
        raise ValueError(f"steps_offset={steps_offset} puts timestep {steps[-1]} outside [0, {T - 1}]")
    return steps[::-1]


# --------------------------------------------------------------------------------------------------------------
# Forward process, posterior, parameterisations
# --------------------------------------------------------------------------------------------------------------


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast per-sample scalars over the image dimensions, in the sample's dtype."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def q_sample(x0: torch.Tensor, t: int | torch.Tensor, noise: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I) (Ho et al. 2020, eq. 4).

    `t` is one timestep or one per sample; `noise` is the standard normal draw, given for reproducibility.
    """
    ab = ac[torch.as_tensor(t)]
    return _per_sample(ab.sqrt(), x0) * x0 + _per_sample((1 - ab).sqrt(), x0) * noise


def step_beta(t: int, t_prev: int, ac: torch.Tensor) -> torch.Tensor:
    """beta_{t|t_prev} = 1 - alpha_bar_t / alpha_bar_{t_prev}: beta_t for a unit step, the respaced beta of
    Nichol & Dhariwal 2021, sec. 4, for a strided one."""
    return 1 - alpha_bar(ac, t) / alpha_bar(ac, t_prev)


def posterior_variance(t: int, t_prev: int, ac: torch.Tensor) -> torch.Tensor:
    """beta_tilde = (1 - ab_prev) / (1 - ab_t) beta (Ho et al. 2020, eq. 7), a float64 scalar; 0 at the last
    step."""
    return (1 - alpha_bar(ac, t_prev)) / (1 - alpha_bar(ac, t)) * step_beta(t, t_prev, ac)


def posterior_mean_variance(
    x0: torch.Tensor, x_t: torch.Tensor, t: int, t_prev: int, ac: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance of q(x_{t_prev} | x_t, x_0) (Ho et al. 2020, eqs. 6-7):

    mean = sqrt(ab_prev) (1 - alpha) / (1 - ab_t) x_0 + sqrt(alpha) (1 - ab_prev) / (1 - ab_t) x_t,
    variance = `posterior_variance`, with alpha = ab_t / ab_prev (the strided form of Nichol & Dhariwal 2021).
    """
    ab_t, ab_prev = alpha_bar(ac, t), alpha_bar(ac, t_prev)
    alpha = ab_t / ab_prev
    mean = (ab_prev.sqrt() * (1 - alpha) / (1 - ab_t)) * x0 + (alpha.sqrt() * (1 - ab_prev) / (1 - ab_t)) * x_t
    return mean, posterior_variance(t, t_prev, ac)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float | None = None) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, sec. 2.3): per sample, s = max(1, the `ratio`
    quantile of |x_0|); clip x_0 to [-s, s] and divide by s. `max_value` optionally caps s (None: no cap)."""
    flat = x0.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.maximum(torch.minimum(flat, s), -s) / s).reshape(x0.shape)


def predict_x0(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    ac: torch.Tensor,
    prediction_type: PredictionType = "epsilon",
    clip: float | None = 1.0,
) -> torch.Tensor:
    """x_0 implied by the model output, optionally clipped to [-clip, clip].

    - "epsilon": x_0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t) (Ho et al. 2020, eq. 15; DDIM eq. 12's
      "predicted x_0").
    - "sample": the model predicts x_0 itself.
    - "v_prediction": x_0 = sqrt(ab_t) x_t - sqrt(1 - ab_t) v (Salimans & Ho 2022, sec. 4 and appendix D).
    Clipping to the data range [-1, 1] is what the DDPM code does when sampling ("clip_denoised").
    """
    ab = alpha_bar(ac, t)
    if prediction_type == "epsilon":
        x0 = (x_t - (1 - ab).sqrt() * model_output) / ab.sqrt()
    elif prediction_type == "sample":
        x0 = model_output
    elif prediction_type == "v_prediction":
        x0 = ab.sqrt() * x_t - (1 - ab).sqrt() * model_output
    else:
        raise ValueError(f"unknown prediction type {prediction_type!r}")
    return x0 if clip is None else x0.clamp(-clip, clip)


def predict_epsilon(
    model_output: torch.Tensor, x_t: torch.Tensor, t: int, ac: torch.Tensor, prediction_type: PredictionType
) -> torch.Tensor:
    """The noise implied by the (unclipped) model output: the eps_theta of DDIM eq. 12.

    "sample": eps = (x_t - sqrt(ab_t) x_0) / sqrt(1 - ab_t) (eq. 4 solved for eps); "v_prediction":
    eps = sqrt(ab_t) v + sqrt(1 - ab_t) x_t (Salimans & Ho 2022, appendix D).
    """
    ab = alpha_bar(ac, t)
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (x_t - ab.sqrt() * model_output) / (1 - ab).sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * model_output + (1 - ab).sqrt() * x_t
    raise ValueError(f"unknown prediction type {prediction_type!r}")


# --------------------------------------------------------------------------------------------------------------
# One reverse step
# --------------------------------------------------------------------------------------------------------------


def ddpm_variance(
    t: int,
    t_prev: int,
    ac: torch.Tensor,
    variance_type: VarianceType = "fixed_small",
    model_var_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Variance sigma_t^2 of p(x_{t_prev} | x_t).

    - "fixed_small": sigma^2 = beta_tilde, the posterior variance (Ho et al. 2020, sec. 3.2, eq. 7).
    - "fixed_large": sigma^2 = beta (Ho et al. 2020, sec. 3.2; both "had similar results").
    - "learned": the model outputs log sigma^2 directly (the LEARNED type of Nichol & Dhariwal's code, which
      eq. 15 refines; `model_var_values` are those extra output channels).
    - "learned_range": log sigma^2 = v log beta + (1 - v) log beta_tilde with v = (model_var_values + 1) / 2
      (Nichol & Dhariwal 2021, eq. 15).
    """
    beta, beta_tilde = step_beta(t, t_prev, ac), posterior_variance(t, t_prev, ac)
    if variance_type == "fixed_small":
        return beta_tilde
    if variance_type == "fixed_large":
        return beta
    if model_var_values is None:
        raise ValueError(f"variance_type {variance_type!r} needs the model's variance channels")
    if variance_type == "learned":
        return model_var_values.exp()
    if variance_type == "learned_range":
        frac = (model_var_values + 1) / 2
        return (frac * beta.log() + (1 - frac) * beta_tilde.log()).exp()
    raise ValueError(f"unknown variance type {variance_type!r}")


def ddpm_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    ac: torch.Tensor,
    noise: torch.Tensor | None,
    prediction_type: PredictionType = "epsilon",
    variance_type: VarianceType = "fixed_small",
    clip: float | None = 1.0,
) -> torch.Tensor:
    """Ancestral step x_t -> x_{t_prev} (Ho et al. 2020, Algorithm 2 in its x_0 form, eqs. 6-7 and 15).

    x_{t_prev} = mu_tilde(x_t, x0_hat) + sigma_t z, with x0_hat from `predict_x0`. The last step (t_prev = -1)
    returns the mean: Algorithm 2 sets z = 0 when t = 1. For the learned variance types the model output
    carries 2C channels, the second half being the variance values.
    """
    model_var_values = None
    if variance_type in ("learned", "learned_range"):
        model_output, model_var_values = model_output.chunk(2, dim=1)
    x0 = predict_x0(model_output, x_t, t, ac, prediction_type, clip)
    mean, _ = posterior_mean_variance(x0, x_t, t, t_prev, ac)
    if t_prev < 0:
        return mean
    if noise is None:
        raise ValueError("ddpm_step needs noise for every step but the last")
    variance = ddpm_variance(t, t_prev, ac, variance_type, model_var_values)
    return mean + variance.sqrt().to(x_t.dtype) * noise


def ddim_sigma(t: int, t_prev: int, ac: torch.Tensor, eta: float) -> torch.Tensor:
    """sigma_t(eta) = eta sqrt((1 - ab_prev) / (1 - ab_t)) sqrt(1 - ab_t / ab_prev) (Song et al. 2021, eq. 16):
    eta = 0 is DDIM (deterministic), eta = 1 is the DDPM posterior variance."""
    ab_t, ab_prev = alpha_bar(ac, t), alpha_bar(ac, t_prev)
    return eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()


def ddim_step(
    model_output: torch.Tensor,
    x_t: torch.Tensor,
    t: int,
    t_prev: int,
    ac: torch.Tensor,
    eta: float = 0.0,
    noise: torch.Tensor | None = None,
    prediction_type: PredictionType = "epsilon",
    clip: float | None = 1.0,
) -> torch.Tensor:
    """Generalised DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12):

    x_{t_prev} = sqrt(ab_prev) x0_hat + sqrt(1 - ab_prev - sigma^2) eps_theta + sigma z.

    x0_hat may be clipped; eps_theta is the model's own (unclipped) noise estimate. `noise` (z) is needed only
    when sigma > 0, i.e. eta > 0 and not the last step.
    """
    x0 = predict_x0(model_output, x_t, t, ac, prediction_type, clip)
    eps = predict_epsilon(model_output, x_t, t, ac, prediction_type)
    ab_prev = alpha_bar(ac, t_prev)
    sigma = ddim_sigma(t, t_prev, ac, eta)
    x_prev = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).sqrt() * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs noise")
        x_prev = x_prev + sigma.to(x_t.dtype) * noise
    return x_prev


# --------------------------------------------------------------------------------------------------------------
# Classifier-free guidance
# --------------------------------------------------------------------------------------------------------------


def guided_output(output_cond: torch.Tensor, output_uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6): eps~ = (1 + w) eps(z, c) - w eps(z).

    The paper's w is `guidance_scale - 1` (the diffusers convention: `guidance_scale` 1 is the conditional model
    alone, 0 the unconditional one). The combination is linear, so it holds for any of the model's outputs
    (epsilon, v or x_0), which the step then reads as usual.
    """
    w = guidance_scale - 1.0
    return (1.0 + w) * output_cond - w * output_uncond


def guided_model(
    model: ConditionalModel, condition: torch.Tensor, null_condition: torch.Tensor, guidance_scale: float
) -> Model:
    """The `model(x_t, t)` a sampler takes, from `model(x_t, t, c)`: the conditional and the unconditional
    (`null_condition`) outputs, each from its own call, combined by `guided_output` at every step."""

    def guided(x: torch.Tensor, t: int) -> torch.Tensor:
        return guided_output(model(x, t, condition), model(x, t, null_condition), guidance_scale)

    return guided


# --------------------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------------------


def randn(shape: Sequence[int], generator: Generator = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal draw on the CPU. One generator draws the whole batch at once; a list of generators draws
    one sample from each, so that image i depends on generator i only (a list of one acts as one generator)."""
    shape = tuple(shape)
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, list):
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=dtype) for g in generator])
    return torch.randn(shape, generator=generator, dtype=dtype)


def _next_timesteps(timesteps: Sequence[int]) -> list[tuple[int, int]]:
    ts = [int(t) for t in timesteps]
    return list(zip(ts, [*ts[1:], -1], strict=True))


def ddpm_sample(
    model: Model,
    shape: Sequence[int],
    ac: torch.Tensor,
    timesteps: Sequence[int],
    generator: Generator = None,
    prediction_type: PredictionType = "epsilon",
    variance_type: VarianceType = "fixed_small",
    clip: float | None = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Algorithm 2) over `timesteps` (all of 0..T-1, or a strided subset as
    in Nichol & Dhariwal 2021, sec. 4). `model(x_t, t)` is any callable returning the network output.

    Random draws: x_T first, then one z per step after the model call, for every step but the last.
    """
    x = randn(shape, generator, dtype)
    for t, t_prev in _next_timesteps(timesteps):
        out = model(x, t)
        noise = randn(shape, generator, dtype) if t_prev >= 0 else None
        x = ddpm_step(out, x, t, t_prev, ac, noise, prediction_type, variance_type, clip)
    return x


def ddim_sample(
    model: Model,
    shape: Sequence[int],
    ac: torch.Tensor,
    timesteps: Sequence[int],
    generator: Generator = None,
    eta: float = 0.0,
    prediction_type: PredictionType = "epsilon",
    clip: float | None = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """DDIM sampling (Song et al. 2021, eq. 12) over a decreasing subsequence `timesteps` of 0..T-1.

    Random draws: x_T first, then, only when eta > 0, one z per step after the model call (but the last).
    """
    x = randn(shape, generator, dtype)
    for t, t_prev in _next_timesteps(timesteps):
        out = model(x, t)
        noise = randn(shape, generator, dtype) if eta > 0 and t_prev >= 0 else None
        x = ddim_step(out, x, t, t_prev, ac, eta, noise, prediction_type, clip)
    return x
