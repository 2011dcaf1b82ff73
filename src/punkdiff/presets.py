"""Named presets: a `UNet2DModel` config, a `DDPMScheduler` config, data and training defaults.

Every configuration of the projects punkdiff absorbs is a preset here. A preset is plain data
(dataclasses), so it can be printed, saved into `training_summary.json`, overridden from a
YAML/JSON file or `--set section.key=value` flags, and validated before anything heavy runs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import ImageColor

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "quadratic", "cosine")
# diffusers has no "quadratic": its `scaled_linear` (linspace(sqrt(b0), sqrt(b1))**2) *is* the
# original DDPM codebase's "quad" schedule, so the name maps onto it exactly. "cosine" is the
# Nichol & Dhariwal schedule, which diffusers calls `squaredcos_cap_v2`.
_SCHEDULE_ALIASES = {"quadratic": "scaled_linear", "cosine": "squaredcos_cap_v2"}
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
VARIANCE_TYPES = ("fixed_small", "fixed_large")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
# diffusers.optimization.SchedulerType values (a test keeps the two in step)
LR_SCHEDULERS = (
    "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup", "piecewise_constant"
)
RESIZE_FILTERS = ("nearest", "bilinear", "bicubic", "lanczos", "box")
BALANCE_CONDITIONS = ("none", "sampler", "loss")
# The DDIM noise weight punkdiff samples with unless told otherwise (training grids, and through
# `RECOMMENDED_SAMPLING` every export): eta 1 draws fresh noise at each step, as DDPM does, which corrects what a
# small, briefly trained model gets wrong (measured on every preset model: docs/results.md, "The sampler").
DDIM_ETA = 1.0
# What a trained model's export recommends (its `sampling.json`), which the pipeline, `punkdiff sample`/`gif`/`eval`
# and the sampling helpers use when not told otherwise; also their defaults for a model saved without one.
RECOMMENDED_SAMPLING = {"sampler": "ddim", "num_inference_steps": 50, "eta": DDIM_ETA}
# the largest sampling seed the CLI and the web app take: image i uses seed + i, and torch's generators take up to
# 2**64 - 1, so this leaves room for any count
MAX_SAMPLING_SEED = 2**63 - 1


class PresetError(ValueError):
    """A preset, override or combination that cannot work; the message says what to change."""


class PresetWarning(UserWarning):
    """A preset that trains but is known to sample badly; the message says what to change."""


@dataclass
class ModelSpec:
    """The UNet, described by what people tune; `unet_config()` turns it into `UNet2DModel` kwargs."""

    sample_size: int
    in_channels: int
    out_channels: int
    block_out_channels: tuple[int, ...]
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = ()
    mid_attention: bool = True
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_head_dim: int = 8

    def resolutions(self) -> list[int]:
        """Feature-map size at each level of the UNet, from the input down."""
        return [self.sample_size // 2**i for i in range(len(self.block_out_channels))]

    def unet_config(self) -> dict[str, Any]:
        """`UNet2DModel` kwargs: attention blocks exactly at the levels whose size is listed."""
        levels = self.resolutions()
        attn = [res in self.attention_resolutions for res in levels]
        return {
            "sample_size": self.sample_size,
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "block_out_channels": tuple(self.block_out_channels),
            "layers_per_block": self.layers_per_block,
            "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attn),
            "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)),
            "add_attention": self.mid_attention,
            "dropout": self.dropout,
            "norm_num_groups": self.norm_num_groups,
            "attention_head_dim": self.attention_head_dim,
        }


@dataclass
class SchedulerSpec:
    """The forward process; `ddpm_config()` gives `DDPMScheduler` kwargs."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    prediction_type: str = "epsilon"
    variance_type: str = "fixed_small"
    clip_sample: bool = True
    # where a DDIM of n steps samples: "trailing" starts at t = T - 1, as a distilled student needs
    timestep_spacing: str = "leading"
    # remedies for a forward process that ends short of pure noise (see `terminal_alpha_bar`):
    # improved-diffusion's betas scaled by 1000 / T, so a short schedule adds as much noise as T = 1000 does
    scale_betas_by_timesteps: bool = False
    # Lin et al. 2024: rescale the betas so alpha_bar(T - 1) = 0 (zero terminal SNR; pair it with v_prediction)
    rescale_betas_zero_snr: bool = False

    def betas_range(self) -> tuple[float, float]:
        """(beta_start, beta_end) as the scheduler gets them, after `scale_betas_by_timesteps`."""
        scale = 1000 / self.num_train_timesteps if self.scale_betas_by_timesteps else 1.0
        return self.beta_start * scale, self.beta_end * scale

    def ddpm_config(self) -> dict[str, Any]:
        """`DDPMScheduler` kwargs, with the schedule aliases resolved to diffusers' names."""
        beta_start, beta_end = self.betas_range()
        return {
            "num_train_timesteps": self.num_train_timesteps,
            "beta_schedule": _SCHEDULE_ALIASES.get(self.beta_schedule, self.beta_schedule),
            "beta_start": beta_start,
            "beta_end": beta_end,
            "prediction_type": self.prediction_type,
            "variance_type": self.variance_type,
            "clip_sample": self.clip_sample,
            "timestep_spacing": self.timestep_spacing,
            "rescale_betas_zero_snr": self.rescale_betas_zero_snr,
        }

    def terminal_alpha_bar(self) -> float:
        """alpha_bar at t = T - 1: the signal fraction left where sampling starts from pure N(0, I).

        Above ~1e-3 the model never sees, in training, the pure noise it is started from at sampling time (the
        original MNIST projects' T = 300 schedule ends at 0.048, a signal std of 0.22). Computed in plain Python
        (no torch), as diffusers builds the schedule.
        """
        if self.rescale_betas_zero_snr:
            return 0.0
        T, (b0, b1) = self.num_train_timesteps, self.betas_range()
        schedule = _SCHEDULE_ALIASES.get(self.beta_schedule, self.beta_schedule)
        if schedule == "squaredcos_cap_v2":
            def f(x: float) -> float:
                return math.cos((x + 0.008) / 1.008 * math.pi / 2) ** 2

            betas = [min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)]
        elif schedule == "scaled_linear":
            betas = [(b0**0.5 + (b1**0.5 - b0**0.5) * i / (T - 1)) ** 2 for i in range(T)]
        else:
            betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
        return math.prod(1 - b for b in betas)


@dataclass
class DataSpec:
    """How raw images become training tensors for this preset."""

    dataset: str | None = None  # Hub id or local path; None means it must be given
    split: str = "train"
    image_column: str | None = None  # None: the first column of type `Image`
    max_samples: int | None = None  # keep only the first N images (quick experiments, tests)
    resolution: int = 32
    channels: int = 3  # 1 (grayscale) or 3 (RGB)
    background: str = "#ffffff"  # RGBA images are composited onto this colour
    resize_filter: str = "bicubic"  # "nearest" for pixel art, an antialiased filter for photos
    center_crop: bool = False
    random_flip: bool = False
    # columns the model is told (`--condition-on`): a ClassLabel, or a sequence of ClassLabels or strings, each;
    # empty for an unconditional model (see docs/conditional.md)
    condition_on: tuple[str, ...] = ()
    # Hub license id for the model card of a model trained on this data ("other" where the data's
    # own terms restrict use, e.g. CelebA is for non-commercial research only)
    license: str = "other"


@dataclass
class TrainSpec:
    """Optimisation defaults; every field is a `train.*` override and most have a CLI flag."""

    learning_rate: float = 3e-4
    batch_size: int = 64
    epochs: int = 100
    max_steps: int | None = None  # overrides epochs when set
    gradient_accumulation_steps: int = 1
    lr_scheduler: str = "cosine"
    lr_warmup_steps: int = 500
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    use_ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup: bool = True
    ema_inv_gamma: float = 1.0
    ema_power: float = 0.75
    snr_gamma: float | None = None  # min-SNR-gamma loss weighting (5.0 is the paper's value)
    mixed_precision: str = "no"
    # rare classes of a conditional run: "none", "sampler" (class-balanced draws) or "loss" (per-image loss weights)
    balance_conditions: str = "none"
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    sample_every: int = 500
    num_sample_images: int = 16
    sample_inference_steps: int = 50
    sample_eta: float = DDIM_ETA  # the preview grids' DDIM noise weight (0 for a distilled student's steps)


@dataclass
class Preset:
    name: str
    description: str
    model: ModelSpec
    scheduler: SchedulerSpec
    data: DataSpec
    train: TrainSpec = field(default_factory=TrainSpec)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data: what training_summary.json and checkpoints record."""
        return dataclasses.asdict(self)

    def validate(self) -> Preset:
        """Fail early, with the fix in the message, for combinations that cannot train; warn (`PresetWarning`)
        about those that train but sample badly."""
        problems = _problems(self)
        if problems:
            raise PresetError(f"invalid configuration for preset {self.name!r}:\n  - " + "\n  - ".join(problems))
        for message in _noise_schedule_warnings(self.scheduler):
            warnings.warn(f"preset {self.name!r}: {message}", PresetWarning, stacklevel=2)
        return self


def _mnist16(name: str, description: str, T: int, beta_end: float, lr: float) -> Preset:
    return Preset(
        name=name,
        description=description,
        model=ModelSpec(16, 1, 1, (32, 64, 64), layers_per_block=1, mid_attention=False, norm_num_groups=8),
        scheduler=SchedulerSpec(num_train_timesteps=T, beta_start=1e-4, beta_end=beta_end),
        data=DataSpec(dataset="ylecun/mnist", license="mit", resolution=16, channels=1, resize_filter="bilinear"),
        train=TrainSpec(learning_rate=lr, batch_size=128, lr_warmup_steps=100),
    )


def _reaching_noise(preset: Preset) -> Preset:
    """The original projects' schedule, rescaled to zero terminal SNR with a v target (Lin et al. 2024).

    As the seeds had them, T = 300 ends at alpha_bar(T-1) = 0.048 and beta_end = 0.01 at 0.0063, while sampling
    starts from pure noise. At equal steps on MNIST this remedy beat both the schedule as it was and betas x 1000/T
    (docs/results.md). The seeds' settings stay one flag away:
    `--set scheduler.rescale_betas_zero_snr=false --set scheduler.prediction_type=epsilon`.
    """
    scheduler = dataclasses.replace(preset.scheduler, rescale_betas_zero_snr=True, prediction_type="v_prediction")
    return dataclasses.replace(preset, scheduler=scheduler)


_PUNKS_DATA = dict(dataset="huggingnft/cryptopunks", channels=3, background="#638596", resize_filter="nearest")
_CELEBA_DATA = dict(dataset="nielsr/CelebA-faces", channels=3, resize_filter="bicubic", center_crop=True,
                    random_flip=True)

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in [
        dataclasses.replace(
            _mnist16("mnist-16", "MNIST, tuned for quality per CPU minute: cosine schedule, v-prediction, lr 1e-3, "
                     "min-SNR-5, EMA 0.999, 5,200 steps of 32, sized for a 15-minute CPU budget", 1000, 0.02, 1e-3),
            scheduler=SchedulerSpec(beta_schedule="cosine", prediction_type="v_prediction"),
            train=TrainSpec(learning_rate=1e-3, batch_size=32, max_steps=5200, lr_warmup_steps=100, snr_gamma=5.0,
                            ema_decay=0.999),
        ),
        _mnist16("mnist-baseline-16", "MNIST baseline DDPM: T=1000, linear betas 1e-4..0.02, lr 3e-4",
                 1000, 0.02, 3e-4),
        _reaching_noise(_mnist16("mnist-fast-16", "MNIST fast prototyping: T=300, linear betas 1e-4..0.02 rescaled "
                                 "to zero terminal SNR, v-prediction, lr 3e-4", 300, 0.02, 3e-4)),
        _reaching_noise(_mnist16("mnist-hp-16", "MNIST high precision: T=1000, linear betas 1e-4..0.01 rescaled to "
                                 "zero terminal SNR, v-prediction, lr 2e-4", 1000, 0.01, 2e-4)),
        Preset(
            name="mnist-28",
            description="MNIST at native 28 px: residual UNet with attention at 7 px, cosine schedule",
            model=ModelSpec(28, 1, 1, (64, 128, 128), attention_resolutions=(7,)),
            scheduler=SchedulerSpec(beta_schedule="cosine"),
            data=DataSpec(dataset="ylecun/mnist", license="mit", resolution=28, channels=1, resize_filter="bilinear"),
            train=TrainSpec(learning_rate=2e-4, batch_size=128),
        ),
        Preset(
            name="punks-32",
            description="CryptoPunks upscaled to 32 px (nearest): UNet with attention at 16 and 8 px",
            model=ModelSpec(32, 3, 3, (64, 128, 256, 256), attention_resolutions=(16, 8)),
            scheduler=SchedulerSpec(),
            data=DataSpec(resolution=32, **_PUNKS_DATA),
            train=TrainSpec(learning_rate=3e-4, batch_size=64),
        ),
        Preset(
            name="punks-24-cpu",
            description="CryptoPunks at native 24 px, sized for a 30-minute budget on 2 CPU cores: small UNet, cosine "
                        "schedule, v-prediction, lr 1e-3, min-SNR-5, EMA 0.999, 15,000 steps of 16 in bf16 (float32 "
                        "on a CPU without native bf16)",
            model=ModelSpec(24, 3, 3, (32, 64, 128), layers_per_block=1, mid_attention=False, norm_num_groups=8),
            scheduler=SchedulerSpec(beta_schedule="cosine", prediction_type="v_prediction"),
            data=DataSpec(resolution=24, **_PUNKS_DATA),
            # at equal CPU time, more and smaller steps learn faster, and bf16 scores as float32 in less time
            # (docs/results.md, "CryptoPunks on CPU")
            train=TrainSpec(learning_rate=1e-3, batch_size=16, max_steps=15000, lr_warmup_steps=100, snr_gamma=5.0,
                            ema_decay=0.999, mixed_precision="bf16"),
        ),
        Preset(
            name="punks-24",
            description="CryptoPunks at native 24 px: UNet 24-12-6 with attention at 12 and 6 px",
            model=ModelSpec(24, 3, 3, (64, 128, 256), attention_resolutions=(12, 6)),
            scheduler=SchedulerSpec(),
            data=DataSpec(resolution=24, **_PUNKS_DATA),
            train=TrainSpec(learning_rate=3e-4, batch_size=64),
        ),
        Preset(
            name="celeba-64",
            description="CelebA faces, center crop to 64 px: UNet with attention at 16 px",
            model=ModelSpec(64, 3, 3, (64, 128, 256, 256), attention_resolutions=(16,), dropout=0.1),
            scheduler=SchedulerSpec(),
            data=DataSpec(resolution=64, **_CELEBA_DATA),
            train=TrainSpec(learning_rate=2e-4, batch_size=64),
        ),
        Preset(
            name="celeba-128",
            description="CelebA faces, center crop to 128 px: 5-level UNet with attention at 16 px",
            model=ModelSpec(128, 3, 3, (64, 128, 128, 256, 256), attention_resolutions=(16,), dropout=0.1),
            scheduler=SchedulerSpec(),
            data=DataSpec(resolution=128, **_CELEBA_DATA),
            train=TrainSpec(learning_rate=2e-4, batch_size=32),
        ),
        Preset(
            name="imagefolder-128",
            description="Generic image folder at 128 px: base 192, mult 1,2,3,4, attention at 16 px, "
            "dropout 0.1, cosine, EMA 0.999",
            model=ModelSpec(128, 3, 3, (192, 384, 576, 768), attention_resolutions=(16,), dropout=0.1),
            scheduler=SchedulerSpec(beta_schedule="cosine"),
            data=DataSpec(resolution=128, channels=3, resize_filter="bicubic", center_crop=True, random_flip=True),
            train=TrainSpec(learning_rate=2e-4, batch_size=8, ema_decay=0.999, max_grad_norm=1.0),
        ),
    ]
}


def _noise_schedule_warnings(s: SchedulerSpec) -> list[str]:
    """A forward process that stops short of noise, and zero terminal SNR with an epsilon target."""
    found = []
    alpha_bar = s.terminal_alpha_bar()
    if alpha_bar > 1e-3:
        scaled = dataclasses.replace(s, scale_betas_by_timesteps=True)
        remedy = (
            f"scheduler.scale_betas_by_timesteps=true (betas x 1000/T, as improved-diffusion: alpha_bar "
            f"{scaled.terminal_alpha_bar():.2g}) or "
            if scaled.betas_range()[1] < 1 and not s.scale_betas_by_timesteps and s.num_train_timesteps != 1000
            else ""
        )
        found.append(
            f"the forward process ends at alpha_bar(T-1) = {alpha_bar:.2g} (signal std {alpha_bar**0.5:.2f}), but "
            f"sampling starts from pure noise, which the model never sees in training; use {remedy}"
            "scheduler.rescale_betas_zero_snr=true with scheduler.prediction_type=v_prediction (Lin et al. 2024)"
        )
    if s.rescale_betas_zero_snr and s.prediction_type == "epsilon":
        found.append(
            "zero terminal SNR with an epsilon target cannot predict x_0 at t = T-1 (Lin et al. 2024): "
            "use scheduler.prediction_type=v_prediction"
        )
    return found


def _problems(preset: Preset) -> list[str]:
    """Everything that would make this preset fail later, each with what to change."""
    m, s, d, t = preset.model, preset.scheduler, preset.data, preset.train
    problems = _range_problems(preset)
    if problems:  # the combination checks below divide and compare these numbers: only run them on sane ones
        return problems
    if s.beta_schedule not in BETA_SCHEDULES:
        problems.append(f"unknown beta schedule {s.beta_schedule!r}: use one of {', '.join(BETA_SCHEDULES)}")
    if s.prediction_type not in PREDICTION_TYPES:
        problems.append(f"unknown prediction type {s.prediction_type!r}: use one of {', '.join(PREDICTION_TYPES)}")
    if s.variance_type not in VARIANCE_TYPES:
        problems.append(f"unknown variance type {s.variance_type!r}: use one of {', '.join(VARIANCE_TYPES)}")
    if s.timestep_spacing not in TIMESTEP_SPACINGS:
        problems.append(f"unknown timestep spacing {s.timestep_spacing!r}: use one of {', '.join(TIMESTEP_SPACINGS)}")
    if not 0 < s.betas_range()[0] < s.betas_range()[1] < 1:
        problems.append(f"betas must satisfy 0 < beta_start < beta_end < 1 (got {s.betas_range()})")
    if s.num_train_timesteps < 2:
        problems.append(f"num_train_timesteps must be at least 2 (got {s.num_train_timesteps})")
    factor = 2 ** (len(m.block_out_channels) - 1)
    if m.sample_size % factor:
        ok = [r for r in range(m.sample_size - factor, m.sample_size + factor + 1) if r > 0 and r % factor == 0]
        problems.append(
            f"sample size {m.sample_size} is not divisible by the UNet's downsampling factor {factor} "
            f"({len(m.block_out_channels)} levels): use data.resolution/model.sample_size {ok} or fewer levels"
        )
    unreached = sorted(set(m.attention_resolutions) - set(m.resolutions()))
    if unreached:
        problems.append(
            f"attention at {unreached} px is never reached: the UNet's levels are {m.resolutions()} px"
        )
    bad_groups = [c for c in m.block_out_channels if c % m.norm_num_groups]
    if bad_groups:
        problems.append(f"block_out_channels {bad_groups} are not divisible by norm_num_groups={m.norm_num_groups}")
    if d.channels not in (1, 3):
        problems.append(f"data.channels must be 1 (grayscale) or 3 (RGB), got {d.channels}")
    if m.in_channels != d.channels or m.out_channels != d.channels:
        problems.append(
            f"the UNet has in/out channels {m.in_channels}/{m.out_channels} but the data has {d.channels}: "
            f"set model.in_channels and model.out_channels to {d.channels} (or data.channels to match)"
        )
    if m.sample_size != d.resolution:
        problems.append(
            f"model.sample_size {m.sample_size} differs from data.resolution {d.resolution}: set both to the same"
        )
    if d.resize_filter not in RESIZE_FILTERS:
        problems.append(f"unknown resize filter {d.resize_filter!r}: use one of {', '.join(RESIZE_FILTERS)}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"mixed_precision must be no, fp16 or bf16 (got {t.mixed_precision!r})")
    for name in ("learning_rate", "batch_size", "gradient_accumulation_steps", "epochs"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name} must be positive (got {getattr(t, name)})")
    if not 0 < t.ema_decay < 1:
        problems.append(f"train.ema_decay must be in (0, 1) (got {t.ema_decay})")
    for name in ("num_sample_images", "checkpoint_every", "sample_every", "max_grad_norm"):
        if getattr(t, name) <= 0:
            problems.append(f"train.{name} must be positive (got {getattr(t, name)})")
    for name, value in (("train.max_steps", t.max_steps), ("train.checkpoints_total_limit", t.checkpoints_total_limit),
                        ("train.snr_gamma", t.snr_gamma), ("data.max_samples", d.max_samples)):
        if value is not None and value <= 0:
            problems.append(f"{name} must be positive or null (got {value})")
    if t.lr_warmup_steps < 0:
        problems.append(f"train.lr_warmup_steps must be >= 0 (got {t.lr_warmup_steps})")
    if t.lr_scheduler not in LR_SCHEDULERS:
        problems.append(f"unknown train.lr_scheduler {t.lr_scheduler!r}: use one of {', '.join(LR_SCHEDULERS)}")
    if not 0 <= t.sample_eta <= 1:
        problems.append(f"train.sample_eta must be in [0, 1] (got {t.sample_eta})")
    if not 1 <= t.sample_inference_steps <= s.num_train_timesteps:
        problems.append(
            f"train.sample_inference_steps must be in [1, {s.num_train_timesteps}] (got {t.sample_inference_steps})"
        )
    if any(not c or c != c.strip() or "," in c for c in d.condition_on) or len(set(d.condition_on)) != len(
            d.condition_on):
        problems.append(f"data.condition_on must name each column once, without spaces or commas (got "
                        f"{list(d.condition_on)})")
    if t.balance_conditions not in BALANCE_CONDITIONS:
        problems.append(f"train.balance_conditions must be one of {', '.join(BALANCE_CONDITIONS)} (got "
                        f"{t.balance_conditions!r})")
    elif t.balance_conditions != "none" and not d.condition_on:
        problems.append(f"train.balance_conditions {t.balance_conditions!r} balances the classes of a conditional "
                        "run: add --condition-on COLUMN[,COLUMN], or leave it 'none'")
    try:
        ImageColor.getrgb(d.background)
    except ValueError:
        problems.append(f"data.background {d.background!r} is not a colour: use e.g. '#638596' or 'white'")
    return problems


# Bounds beyond which a value is a typo, not an experiment: each would fail (or exhaust memory) long after the data
# has loaded. Resolution 4096 and 100,000 timesteps are far beyond any published pixel-space DDPM.
def _conditioned(preset: Preset, name: str, what: str, columns: tuple[str, ...], balance: str) -> Preset:
    """`preset`, told `columns` of its data: the same model, schedule and budget (the UNet's class embedding and
    the attribute encoder are sized from the data's vocabulary when the run starts).

    Its samplers do not clip x_0: diffusers' DDIM clips the predicted x_0 but keeps the predicted noise, and under
    guidance's extrapolation (w > 1) that mismatch sends the trajectory off the data: digits of other classes at
    w = 3, clean ones of the asked class without the clip (docs/conditional.md, "Guidance").
    """
    return dataclasses.replace(
        preset, name=name, description=f"{preset.name}, conditioned on {what} (classifier-free guidance)",
        scheduler=dataclasses.replace(preset.scheduler, clip_sample=False),
        data=dataclasses.replace(preset.data, condition_on=columns),
        train=dataclasses.replace(preset.train, balance_conditions=balance),
    )


# the conditional twins: MNIST's digits are balanced; the punks' types are not (9 Aliens, 6,039 Males), so their
# rare types are drawn more often (docs/conditional.md, "Rare classes")
PRESETS.update({p.name: p for p in (
    _conditioned(PRESETS["mnist-16"], "mnist-16-cond", "the digit", ("label",), "none"),
    _conditioned(PRESETS["punks-24-cpu"], "punks-24-cond-cpu", "the punk's type and accessories",
                 ("type", "accessories"), "sampler"),
)})


MAX_RESOLUTION = 4096
MAX_TIMESTEPS = 100_000
MAX_SAMPLE_IMAGES = 1024
_MAX_INT = 2**31  # beyond this an integer setting overflows torch's int32 indexing or the memory of any machine


def _as_tuple(value: object) -> tuple:
    return value if isinstance(value, tuple) else (value,)


def _range_problems(preset: Preset) -> list[str]:
    """Numbers that are not finite or outside the range their field allows, each with the range."""
    m, s, d, t = preset.model, preset.scheduler, preset.data, preset.train
    problems: list[str] = []
    for section, spec in (("model", m), ("scheduler", s), ("data", d), ("train", t)):
        for f in dataclasses.fields(spec):
            value = getattr(spec, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                problems.append(f"{section}.{f.name} must be a finite number (got {value})")
            elif any(isinstance(v, int) and abs(v) >= _MAX_INT for v in _as_tuple(value)):
                problems.append(f"{section}.{f.name} {value} is absurdly large: use a value below {_MAX_INT}")
    if problems:
        return problems

    def require(ok: bool, what: str, value: object) -> None:
        if not ok:
            problems.append(f"{what} (got {value})")

    require(1 <= m.sample_size <= MAX_RESOLUTION, f"model.sample_size must be in [1, {MAX_RESOLUTION}]", m.sample_size)
    require(1 <= d.resolution <= MAX_RESOLUTION, f"data.resolution must be in [1, {MAX_RESOLUTION}]", d.resolution)
    require(len(m.block_out_channels) > 0 and all(c > 0 for c in m.block_out_channels),
            "model.block_out_channels must be a non-empty list of positive widths, e.g. [32, 64]", m.block_out_channels)
    require(all(r > 0 for r in m.attention_resolutions), "model.attention_resolutions must be positive sizes",
            m.attention_resolutions)
    if m.block_out_channels and 1 <= m.sample_size <= MAX_RESOLUTION:
        require(m.sample_size >= 2 ** (len(m.block_out_channels) - 1),
                f"model.sample_size must be at least 2**{len(m.block_out_channels) - 1}, the UNet's downsampling "
                f"factor with {len(m.block_out_channels)} levels: use a larger size or fewer levels", m.sample_size)
    require(m.layers_per_block >= 1, "model.layers_per_block must be at least 1", m.layers_per_block)
    require(m.norm_num_groups >= 1, "model.norm_num_groups must be at least 1", m.norm_num_groups)
    require(m.attention_head_dim >= 1, "model.attention_head_dim must be at least 1", m.attention_head_dim)
    require(0 <= m.dropout < 1, "model.dropout must be in [0, 1)", m.dropout)
    require(m.in_channels >= 1 and m.out_channels >= 1, "model.in_channels and model.out_channels must be positive",
            (m.in_channels, m.out_channels))
    require(s.num_train_timesteps <= MAX_TIMESTEPS, f"scheduler.num_train_timesteps must be at most {MAX_TIMESTEPS}",
            s.num_train_timesteps)
    require(0 <= t.adam_beta1 < 1 and 0 <= t.adam_beta2 < 1, "train.adam_beta1 and adam_beta2 must be in [0, 1)",
            (t.adam_beta1, t.adam_beta2))
    require(t.adam_epsilon > 0, "train.adam_epsilon must be positive", t.adam_epsilon)
    require(t.adam_weight_decay >= 0, "train.adam_weight_decay must be >= 0", t.adam_weight_decay)
    require(t.ema_inv_gamma > 0, "train.ema_inv_gamma must be positive", t.ema_inv_gamma)
    require(t.ema_power > 0, "train.ema_power must be positive", t.ema_power)
    require(t.num_sample_images <= MAX_SAMPLE_IMAGES, f"train.num_sample_images must be at most {MAX_SAMPLE_IMAGES}",
            t.num_sample_images)
    return problems


def get_preset(name: str) -> Preset:
    """A fresh copy of a named preset (safe to modify)."""
    if name not in PRESETS:
        raise PresetError(f"unknown preset {name!r}; available: {', '.join(PRESETS)} (see `punkdiff presets`)")
    return _from_dict(PRESETS[name].to_dict())


def _from_dict(d: dict[str, Any]) -> Preset:
    return Preset(
        name=d["name"],
        description=d["description"],
        model=ModelSpec(**{**d["model"], "block_out_channels": tuple(d["model"]["block_out_channels"]),
                           "attention_resolutions": tuple(d["model"]["attention_resolutions"])}),
        scheduler=SchedulerSpec(**d["scheduler"]),
        data=DataSpec(**{**d["data"], "condition_on": tuple(d["data"].get("condition_on", ()))}),
        train=TrainSpec(**d["train"]),
    )


_SECTIONS = {"model": ModelSpec, "scheduler": SchedulerSpec, "data": DataSpec, "train": TrainSpec}


def apply_overrides(preset: Preset, overrides: dict[str, Any]) -> Preset:
    """Return a new preset with nested `{section: {key: value}}` overrides applied.

    Unknown sections or keys are errors (a typo must not silently train the wrong model).
    """
    d = preset.to_dict()
    for section, values in overrides.items():
        if section in ("name", "description"):
            if not isinstance(values, str):
                raise PresetError(f"{section} must be a string, got {values!r}")
            d[section] = values
            continue
        if section not in _SECTIONS:
            raise PresetError(f"unknown config section {section!r}; use one of {', '.join(_SECTIONS)}")
        if not isinstance(values, dict):
            raise PresetError(f"config section {section!r} must be a mapping of keys to values")
        known = {f.name: f.type for f in dataclasses.fields(_SECTIONS[section])}
        for key, value in values.items():
            if key not in known:
                raise PresetError(f"unknown key {section}.{key}; known keys: {', '.join(sorted(known))}")
            d[section][key] = _coerce(f"{section}.{key}", value, known[key])
    return _from_dict(d)


def _coerce(name: str, value: Any, annotation: str) -> Any:
    """Give an override the type its field declares, or fail naming the key.

    YAML (files and `--set`) reads `1e-4` as a string and `16` where a list is expected as a
    scalar; both would otherwise crash later with a bare TypeError, or train the wrong thing.
    """
    if value is None and "None" in annotation:
        return None
    kind = annotation.split(" |")[0].split("[")[0]
    if annotation.startswith("tuple[str"):  # column names: "type,accessories" or a list of names
        items = [c.strip() for c in value.split(",")] if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)) or not all(isinstance(v, str) for v in items):
            raise PresetError(f"{name} expects column names (e.g. [type, accessories] or 'type,accessories'), got "
                              f"{value!r}")
        return tuple(items)
    if kind == "tuple":
        items = value if isinstance(value, (list, tuple)) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise PresetError(f"{name} expects a list of integers (e.g. [16, 8]), got {value!r}")
        return tuple(items)
    if kind == "float" and isinstance(value, (str, int)) and not isinstance(value, bool):
        try:
            return float(value)
        except (ValueError, OverflowError):
            raise PresetError(f"{name} expects a number, got {value!r}") from None
    expected = {"float": (int, float), "int": (int,), "bool": (bool,), "str": (str,)}.get(kind)
    if expected and (not isinstance(value, expected) or (kind != "bool" and isinstance(value, bool))):
        hint = " (quote it: YAML reads an unquoted # as a comment)" if kind == "str" and value is None else ""
        raise PresetError(f"{name} expects {kind}, got {value!r}{hint}")
    return float(value) if kind == "float" else value


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read overrides from YAML or JSON: `{preset: NAME?, model: {...}, train: {...}, ...}`."""
    path = Path(path)
    if path.is_dir():
        raise PresetError(f"config file {path} is a folder: give the path of a .yaml or .json file")
    if not path.is_file():
        raise PresetError(f"config file {path} does not exist")
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
    except UnicodeDecodeError as err:
        raise PresetError(f"config file {path} is not UTF-8 text ({err}): save it as UTF-8") from err
    except (json.JSONDecodeError, yaml.YAMLError) as err:  # safe_load refuses tags that would construct objects
        raise PresetError(f"config file {path} could not be parsed: {err}") from err
    if not isinstance(data, dict):
        raise PresetError(f"config file {path} must contain a mapping at the top level")
    return data


def parse_set_flags(items: list[str]) -> dict[str, Any]:
    """Turn `["train.learning_rate=1e-3", "model.block_out_channels=[32,64]"]` into nested overrides.

    Values are parsed as YAML scalars/lists, so numbers, booleans, null and lists work.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or "." not in key:
            raise PresetError(f"--set expects SECTION.KEY=VALUE (e.g. train.learning_rate=1e-4), got {item!r}")
        section, _, name = key.partition(".")
        try:
            out.setdefault(section, {})[name] = yaml.safe_load(raw)
        except yaml.YAMLError as err:  # safe_load refuses tags that would construct objects
            raise PresetError(f"--set {item!r}: the value is not valid YAML ({err})") from err
    return out


def resolve_preset(
    name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> Preset:
    """Preset by name, then the config file, then explicit overrides (CLI flags); validated."""
    file_overrides = load_config_file(config_file) if config_file else {}
    name = name or file_overrides.pop("preset", None)
    file_overrides.pop("preset", None)
    if name is not None and not isinstance(name, str):
        raise PresetError(f"preset must be a preset name (see `punkdiff presets`), got {name!r}")
    if name is None:
        raise PresetError("no preset given: pass --preset NAME (see `punkdiff presets`) or `preset:` in --config")
    preset = apply_overrides(get_preset(name), file_overrides)
    if overrides:
        preset = apply_overrides(preset, overrides)
    return preset.validate()


def count_parameters(model: ModelSpec) -> int:
    """Parameters of the `UNet2DModel` that `model.unet_config()` builds, counted without building it.

    `punkdiff presets` prints these without importing torch; tests/test_presets.py checks the count against the
    real diffusers model for every preset and for random configurations.

    Examples:
        ```py
        >>> count_parameters(get_preset("mnist-baseline-16").model)
        1045729
        ```
    """

    def linear(n_in: int, n_out: int) -> int:
        return n_in * n_out + n_out

    def conv3x3(n_in: int, n_out: int) -> int:
        return 9 * n_in * n_out + n_out

    temb = 4 * model.block_out_channels[0]

    def resnet(n_in: int, n_out: int) -> int:  # ResnetBlock2D: norm, conv, time projection, norm, conv, shortcut
        shortcut = linear(n_in, n_out) if n_in != n_out else 0
        return 2 * n_in + conv3x3(n_in, n_out) + linear(temb, n_out) + 2 * n_out + conv3x3(n_out, n_out) + shortcut

    def attention(c: int) -> int:  # group norm, q, k, v, out; inner size = heads * head size
        inner = (c // model.attention_head_dim) * model.attention_head_dim
        return 2 * c + 3 * linear(c, inner) + linear(inner, c)

    config = model.unet_config()
    channels = list(model.block_out_channels)
    total = conv3x3(model.in_channels, channels[0]) + linear(channels[0], temb) + linear(temb, temb)
    for i, block in enumerate(config["down_block_types"]):
        n_in, n_out = channels[max(i - 1, 0)], channels[i]
        for j in range(model.layers_per_block):
            total += resnet(n_in if j == 0 else n_out, n_out) + (attention(n_out) if block.startswith("Attn") else 0)
        total += conv3x3(n_out, n_out) if i < len(channels) - 1 else 0  # downsampler
    total += 2 * resnet(channels[-1], channels[-1]) + (attention(channels[-1]) if model.mid_attention else 0)
    reversed_channels = channels[::-1]
    for i, block in enumerate(config["up_block_types"]):
        n_prev, n_out = reversed_channels[max(i - 1, 0)], reversed_channels[i]
        n_skip_last = reversed_channels[min(i + 1, len(channels) - 1)]
        for j in range(model.layers_per_block + 1):
            n_in = (n_prev if j == 0 else n_out) + (n_skip_last if j == model.layers_per_block else n_out)
            total += resnet(n_in, n_out) + (attention(n_out) if block.startswith("Attn") else 0)
        total += conv3x3(n_out, n_out) if i < len(channels) - 1 else 0  # upsampler
    return total + 2 * channels[0] + conv3x3(channels[0], model.out_channels)


def format_presets_table() -> str:
    """The `punkdiff presets` table: resolution, channels, attention, schedule and parameter count."""
    rows = [("preset", "res", "ch", "channels", "attn", "T", "schedule", "params", "description")]
    for p in PRESETS.values():
        rows.append((
            p.name,
            f"{p.data.resolution}px",
            "L" if p.data.channels == 1 else "RGB",
            ",".join(map(str, p.model.block_out_channels)),
            ",".join(map(str, p.model.attention_resolutions)) or "-",
            str(p.scheduler.num_train_timesteps),
            p.scheduler.beta_schedule,
            f"{count_parameters(p.model) / 1e6:.2f}M",
            p.description,
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows
    )
