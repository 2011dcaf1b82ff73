"""Parity of the diffusers sampling path with the from-scratch reference in `punkdiff.reference_sampler`.

`run_parity` is what `punkdiff parity` runs: a compact sweep on a small random UNet that a user can repeat on
their own install (other torch/diffusers versions, other hardware). The full, parametrised suite lives in
tests/test_parity.py (`pytest -m parity`) and asserts against `punkdiff.reference_sampler` directly; both use the
adapters below to run the two sides under the same conditions.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from punkdiff import reference_sampler

Model = Callable[[torch.Tensor, Any], torch.Tensor]

ADD_NOISE_TOL = 1e-6
STEP_TOL = 1e-5
SAMPLE_TOL = 1e-4

# Scheduler options the reference does not model: a config using one of them is refused, not half-compared.
_UNMODELLED = {
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "trained_betas": None,
    "set_alpha_to_one": True,
}


def tiny_unet(
    in_channels: int = 1, sample_size: int = 8, seed: int = 0, output_scale: float = 0.1, **config: Any
) -> UNet2DModel:
    """A small random `UNet2DModel` (about 40k parameters): a real diffusers network, fast on a CPU; `config`
    adds to its config (e.g. `num_class_embeds=11`, or `class_embed_type="identity"` for an attribute encoder).

    A random network is no denoiser: at full scale its x_0 predictions saturate the clip, and the deterministic
    DDIM map then amplifies float32 rounding (1 ulp of the schedule) about 6e4-fold over 50 steps, measuring the
    chaos of the network rather than the sampler. Scaling its last layer by `output_scale` keeps the map
    contractive, as a trained model's is (amplification below 30).
    """
    torch.manual_seed(seed)
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        **config,
    ).eval()
    with torch.no_grad():
        unet.conv_out.weight.mul_(output_scale)
        unet.conv_out.bias.mul_(output_scale)
    return unet


def unet_model(unet: UNet2DModel) -> Model:
    """Wrap a UNet as the `model(x_t, t)` callable both samplers take."""
    return lambda x, t: unet(x, t).sample


def conditional_unet_model(
    unet: UNet2DModel, encode: Callable[[torch.Tensor], torch.Tensor] | None = None
) -> reference_sampler.ConditionalModel:
    """Wrap a class-conditional UNet (and its attribute encoder, if any) as the `model(x_t, t, c)` callable of
    `reference_sampler.guided_model`."""
    encode = encode or (lambda c: c)
    return lambda x, t, c: unet(x, t, class_labels=encode(c)).sample


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Tiny tensors run several times faster on one thread, and the results do not depend on thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference_alphas_cumprod(config: Any) -> torch.Tensor:
    """alpha_bar for a diffusers scheduler config, rebuilt by the reference in float32 (the pipeline's dtype)."""
    unsupported = {k: config[k] for k, v in _UNMODELLED.items() if k in config and config[k] != v}
    if unsupported:
        raise ValueError(f"the reference does not model {unsupported}")
    betas = reference_sampler.make_betas(
        config["beta_schedule"], config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    )
    return reference_sampler.alphas_cumprod(betas, torch.float32)


def reference_sample(
    model: Model,
    config: Any,
    sampler: str,
    shape: Sequence[int],
    generator: reference_sampler.Generator,
    num_inference_steps: int,
    eta: float = 0.0,
) -> torch.Tensor:
    """The reference sampler ("ddpm" or "ddim") for the schedule, spacing and parameterisation in `config`."""
    ac = reference_alphas_cumprod(config)
    timesteps = reference_sampler.spaced_timesteps(
        config["num_train_timesteps"], num_inference_steps, config["timestep_spacing"], config["steps_offset"]
    )
    clip = config["clip_sample_range"] if config["clip_sample"] else None
    if sampler == "ddpm":
        return reference_sampler.ddpm_sample(
            model, shape, ac, timesteps, generator, config["prediction_type"], config["variance_type"], clip
        )
    if sampler == "ddim":
        return reference_sampler.ddim_sample(
            model, shape, ac, timesteps, generator, eta, config["prediction_type"], clip
        )
    raise ValueError(f"unknown sampler {sampler!r}")


def diffusers_sample(
    model: Model,
    scheduler: DDPMScheduler | DDIMScheduler,
    shape: Sequence[int],
    generator: reference_sampler.Generator,
    num_inference_steps: int,
    eta: float = 0.0,
) -> torch.Tensor:
    """The stock diffusers loop, as in `DDPMPipeline`/`DDIMPipeline` but without the final [0, 1] clamp."""
    x = randn_tensor(tuple(shape), generator=generator, dtype=torch.float32)
    scheduler.set_timesteps(num_inference_steps)
    kwargs = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
    for t in scheduler.timesteps:
        x = scheduler.step(model(x, t), t, x, generator=generator, **kwargs).prev_sample
    return x


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@dataclass
class ParityRow:
    """One comparison: the largest |diffusers - reference| seen, against its tolerance."""

    case: str
    max_abs_diff: float
    tolerance: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def _add_noise_rows() -> list[ParityRow]:
    rows = []
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        for T in (1000, 999):
            sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
            g = torch.Generator().manual_seed(0)
            x0, noise = torch.randn(2, 8, 3, 8, 8, generator=g)
            t = torch.randint(0, T, (8,), generator=g)
            ref = reference_sampler.q_sample(x0, t, noise, reference_alphas_cumprod(sched.config))
            rows.append(
                ParityRow(
                    f"add_noise {schedule} T={T}", max_abs_diff(sched.add_noise(x0, noise, t), ref), ADD_NOISE_TOL
                )
            )
    return rows


def _step_rows() -> list[ParityRow]:
    g = torch.Generator().manual_seed(0)
    x, out = torch.randn(2, 2, 1, 8, 8, generator=g)
    rows = []
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        ddpm = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
        ddim = DDIMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
        ac = reference_alphas_cumprod(ddpm.config)
        ddpm.set_timesteps(7)
        ddim.set_timesteps(7)
        worst = [0.0, 0.0]
        ts = ddpm.timesteps.tolist()
        for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
            z = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            got = ddpm.step(out, t, x, generator=torch.Generator().manual_seed(1)).prev_sample
            ref = reference_sampler.ddpm_step(out, x, t, t_prev, ac, z if t_prev >= 0 else None, prediction_type)
            worst[0] = max(worst[0], max_abs_diff(got, ref))
            ref = reference_sampler.ddim_step(out, x, t, t_prev, ac, 1.0, z, prediction_type)
            got = ddim.step(out, t, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
            worst[1] = max(worst[1], max_abs_diff(got, ref))
        rows.append(ParityRow(f"DDPM step cosine {prediction_type}", worst[0], STEP_TOL))
        rows.append(ParityRow(f"DDIM step cosine {prediction_type} eta=1", worst[1], STEP_TOL))
    return rows


def _sample_rows(unet: UNet2DModel, T: int) -> list[ParityRow]:
    model = unet_model(unet)
    shape = (2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    trailing_v = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule="squaredcos_cap_v2",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
    )
    cases: list[tuple[str, DDPMScheduler | DDIMScheduler, str, int, float]] = [
        (f"DDPM {T} steps linear", DDPMScheduler(num_train_timesteps=T), "ddpm", T, 0.0),
        ("DDPM 7 steps trailing cosine v", trailing_v, "ddpm", 7, 0.0),
        ("DDIM 50 steps eta=0", DDIMScheduler(num_train_timesteps=T), "ddim", 50, 0.0),
        ("DDIM 50 steps eta=1", DDIMScheduler(num_train_timesteps=T), "ddim", 50, 1.0),
    ]
    rows = []
    for name, sched, sampler, steps, eta in cases:
        got = diffusers_sample(model, sched, shape, torch.Generator().manual_seed(0), steps, eta)
        ref = reference_sample(model, sched.config, sampler, shape, torch.Generator().manual_seed(0), steps, eta)
        rows.append(ParityRow(f"sample: {name}", max_abs_diff(got, ref), SAMPLE_TOL))
    return rows


def _pipeline_rows(unet: UNet2DModel) -> list[ParityRow]:
    """PunkDiffPipeline's DDIM against the reference for the spacings upstream DDIMScheduler gets wrong, and its
    few-step "ddim-trailing" (1, 2, 4, 8 steps) against the reference and against stock `DDIMPipeline`."""
    from punkdiff.pipelines.punkdiff_pipeline import PunkDiffPipeline

    model = unet_model(unet)
    shape = (2, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    rows = []
    for n in FEW_STEPS:
        pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler())
        ours = few_step_trailing(pipe, n)
        ref = reference_sample(model, {**pipe.scheduler.config, "timestep_spacing": "trailing"}, "ddim", shape,
                               torch.Generator().manual_seed(0), n)
        gap = max_abs_diff(ours, (ref / 2 + 0.5).clamp(0, 1))
        rows.append(ParityRow(f"PunkDiffPipeline ddim-trailing {n} steps", gap, SAMPLE_TOL))
        rows.append(ParityRow(f"stock DDIMPipeline trailing {n} steps", max_abs_diff(ours, stock_trailing(pipe, n)),
                              SAMPLE_TOL))
    for spacing in ("leading", "trailing", "linspace"):
        pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler(timestep_spacing=spacing))
        pipe.set_progress_bar_config(disable=True)
        got = pipe(
            batch_size=2,
            generator=torch.Generator().manual_seed(0),
            num_inference_steps=7,
            eta=1.0,
            sampler="ddim",
            output_type="pt",
        ).images
        ref = reference_sample(model, pipe.scheduler.config, "ddim", shape, torch.Generator().manual_seed(0), 7, 1.0)
        rows.append(
            ParityRow(
                f"PunkDiffPipeline DDIM 7 steps {spacing}", max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1)), SAMPLE_TOL
            )
        )
    return rows


def guided_pipeline_vs_reference(
    pipe: Any, request: dict[str, Any], guidance_scale: float, sampler: str, num_inference_steps: int,
    eta: float = 0.0, seeds: Sequence[int] = (0, 1),
) -> float:
    """max |PunkDiffPipeline - reference| for one guided request (`labels=` or `attributes=`, one per seed), with
    per-image generators: the pipeline's doubled batch against the reference's two separate calls per step."""
    got = pipe(**request, guidance_scale=guidance_scale, generator=[torch.Generator().manual_seed(s) for s in seeds],
               num_inference_steps=num_inference_steps, eta=eta, sampler=sampler, output_type="pt").images
    condition = pipe.condition.encode_request(**request)
    condition = condition.repeat(len(seeds), *([1] * (condition.ndim - 1))) if len(condition) == 1 else condition
    model = reference_sampler.guided_model(
        conditional_unet_model(pipe.unet, pipe.attribute_encoder), condition, pipe.condition.null(len(seeds)),
        guidance_scale,
    )
    unet_config = pipe.unet.config
    shape = (len(seeds), unet_config.in_channels, unet_config.sample_size, unet_config.sample_size)
    ref = reference_sample(model, pipe.scheduler.config, sampler, shape,
                           [torch.Generator().manual_seed(s) for s in seeds], num_inference_steps, eta)
    return max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1))


def _guided_rows() -> list[ParityRow]:
    """PunkDiffPipeline's classifier-free guided sampling of digits (the UNet's class embedding) and of attributes
    (the attribute encoder into a `class_embed_type="identity"` UNet) against the reference."""
    from punkdiff.pipelines.punkdiff_pipeline import (
        AttributeEncoder,
        ConditionGroup,
        ConditionVocabulary,
        PunkDiffPipeline,
    )

    digits = ConditionVocabulary((ConditionGroup("label", "single", tuple("0123456789")),))
    attributes = ConditionVocabulary((ConditionGroup("type", "single", ("a", "b", "c")),
                                      ConditionGroup("accessories", "multi", ("x", "y", "z"))))
    torch.manual_seed(0)
    cases = [
        ("labels", PunkDiffPipeline(tiny_unet(num_class_embeds=11), DDPMScheduler(), condition=digits),
         {"labels": [3, 7]}),
        ("attributes", PunkDiffPipeline(tiny_unet(class_embed_type="identity"), DDPMScheduler(),
                                        AttributeEncoder(attributes.width, 32), attributes),
         {"attributes": [{"type": "b", "accessories": ["x", "z"]}, {"accessories": []}]}),
    ]
    rows = []
    for name, pipe, request in cases:
        pipe.set_progress_bar_config(disable=True)
        for sampler, eta in (("ddim", 0.0), ("ddpm", 0.0)):
            diff = guided_pipeline_vs_reference(pipe, request, 3.0, sampler, 7, eta)
            rows.append(ParityRow(f"PunkDiffPipeline {sampler.upper()} 7 steps, {name}, guidance 3", diff, SAMPLE_TOL))
    return rows


# Few-step DDIM with "trailing" spacing (Lin et al. 2024): what a distilled student samples with. Each divides
# T = 1000, where upstream's previous-timestep rule (t - T // n) lands on the next trailing timestep.
FEW_STEPS = (1, 2, 4, 8)


def few_step_trailing(pipe: Any, n: int, eta: float = 0.0, batch_size: int = 2) -> torch.Tensor:
    """PunkDiffPipeline's "ddim-trailing" images in [0, 1] (`[B, C, H, W]`), from `torch.Generator` seed 0."""
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=batch_size, generator=torch.Generator().manual_seed(0), num_inference_steps=n, eta=eta,
                sampler="ddim-trailing", output_type="pt").images


def stock_trailing(pipe: Any, n: int, eta: float = 0.0, batch_size: int = 2) -> torch.Tensor:
    """Stock diffusers `DDIMPipeline` with `DDIMScheduler.from_config(config, timestep_spacing="trailing")` on the
    same UNet and noise as `few_step_trailing`: the route a user without punkdiff takes."""
    from diffusers import DDIMPipeline

    scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing")
    stock = DDIMPipeline(unet=pipe.unet, scheduler=scheduler)
    stock.set_progress_bar_config(disable=True)
    images = stock(batch_size=batch_size, generator=torch.Generator().manual_seed(0), eta=eta,
                   num_inference_steps=n, output_type="np").images
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def run_parity(num_train_timesteps: int = 1000) -> list[ParityRow]:
    """A compact parity sweep (seconds on a CPU): add_noise, single steps, full sampling runs with a
    small random UNet (DDPM over all `num_train_timesteps` steps), PunkDiffPipeline's DDIM for every
    timestep spacing, and its classifier-free guided sampling of labels and attributes."""
    with single_thread(), torch.no_grad():
        unet = tiny_unet()
        return (_add_noise_rows() + _step_rows() + _sample_rows(unet, num_train_timesteps) + _pipeline_rows(unet)
                + _guided_rows())


def format_table(rows: Sequence[ParityRow]) -> str:
    """A plain-text table of the rows, one per line, with PASS/FAIL."""
    width = max(len(r.case) for r in rows)
    lines = [f"{'case':<{width}}  {'max |diff|':>10}  {'tolerance':>9}  result"]
    for r in rows:
        lines.append(
            f"{r.case:<{width}}  {r.max_abs_diff:>10.2e}  {r.tolerance:>9.0e}  {'PASS' if r.passed else 'FAIL'}"
        )
    return "\n".join(lines)
