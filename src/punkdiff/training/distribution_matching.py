"""Distribution matching (Yin et al. 2024, "One-step Diffusion with Distribution Matching Distillation", DMD): a
last stage that moves a distilled student's images toward its teacher's distribution instead of its teacher's path.

A student distilled step by step copies its teacher's deterministic path and its errors; sampled from pure noise,
those errors compound, and the path itself can be worse than the stochastic sampler the teacher is judged by.
Here the student walks its n trailing-DDIM steps from pure noise z_T (with gradients through the walk) to an image
x; x is noised to a random z_t = alpha_t x + sigma_t eps, and two denoisers predict its x_0: the frozen teacher
(the data's score, "real") and a *fake* denoiser, a copy of the teacher that keeps learning the student's own
images. Their difference is the gradient of the KL divergence between the student's and the data's distributions
at noise level t (the paper's Eq. 7, with s = -(z_t - alpha_t x_0) / sigma_t^2 and its normalisation):

    grad_x = (x0_fake - x0_real) / mean|x - x0_real|

applied as the loss 1/2 ||x - stopgrad(x - grad_x)||^2. After each student step the fake denoiser takes
`fake_updates` denoising steps on the student's new images (v-prediction MSE), as DMD2's two time-scale rule does.

Both denoisers only know the teacher's score, and a score can draw its modes in the wrong proportions (the
`punks-24-cpu` teacher's deterministic samplers draw 44-47 % Female punks, the data 38 %). So, as in DMD2 (Yin et
al. 2024b), a GAN term sees the real images too: a discriminator, here a small head on the frozen teacher's
bottleneck features, tells real images from the student's, both noised to the same t >= `GAN_T_LOW` T (what the
images show, not their pixel detail), and the student also descends softplus(-D(z_t)), weighted by `gan_weight`.
With the GAN on, the two denoisers are compared only below `GAN_T_LOW` T: the teacher's score teaches the detail,
and the real images alone decide what the images show and in what proportions (with the score's gradient also at
high noise, the punk type mix landed anywhere from 40 to 45 % Female, seed to seed: docs/few-step.md).
The student stays an ordinary v-prediction `UNet2DModel` sampled by stock trailing DDIM in its n steps.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from punkdiff.training.distillation import alpha_sigma, ddim_step, trailing_timesteps, x0_predictor

# The student's learning rate in the stage, constant: DMD's small steps (the student starts close to its teacher).
DMD_LEARNING_RATE = 1e-5
# What a checkpoint holds of the stage's fake denoiser, in its `FAKE_FOLDER`.
FAKE_FOLDER, FAKE_WEIGHTS, FAKE_OPTIMIZER = "fake_denoiser", "weights.safetensors", "optimizer.safetensors"
# The discriminator's weights and moments are saved beside the fake's, under this prefix.
DISCRIMINATOR = "discriminator."
# The noise levels at which the two denoisers are compared: DMD's [0.02 T, 0.98 T).
T_RANGE = (0.02, 0.98)
# The GAN term's weight beside the DMD loss, the discriminator's learning rate, and the lowest noise level it judges
# (as a fraction of T; with the GAN on, the denoisers are compared below it), measured on `punks-24-cpu` and
# `mnist-16` (docs/few-step.md).
GAN_WEIGHT, DISCRIMINATOR_LEARNING_RATE, GAN_T_LOW = 3.0, 1e-3, 0.3


def default_dmd_steps(teacher_training_steps: int) -> int:
    """Optimizer steps of the distribution-matching stage without `--dmd-steps`: 1/13 of the teacher's training
    steps (400 for `mnist-16`, 1,153 for `punks-24-cpu`). A step (the student's whole walk with gradients, the two
    denoisers, two fake and two discriminator updates) costs about 6.8 training steps, so the stage takes about half
    the teacher's training time and the whole distillation stays within twice it; `benchmarks/bench_distill.py`
    times it (docs/few-step.md).

    Examples:
        ```py
        >>> default_dmd_steps(15000), default_dmd_steps(5200), default_dmd_steps(10)
        (1153, 400, 1)
        ```
    """
    return max(1, teacher_training_steps // 13)


class Discriminator(torch.nn.Module):
    """The GAN's classifier: a small head on the frozen teacher's bottleneck features (the output of its
    `mid_block`), one logit per image, positive for real. A probe on features the teacher already has learns in the
    stage's few hundred steps, where a discriminator of its own would not."""

    def __init__(self, channels: int, groups: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, stride=2, padding=1), torch.nn.GroupNorm(groups, channels),
            torch.nn.SiLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(channels, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(1)


class DistributionMatchingLoss:
    """The loss of the distribution-matching stage, called as the training loop calls its loss.

    The loop's `noise` is the student's z_T and `clean` the real images the discriminator sees; `timesteps` and
    `snr_gamma` are not used. The fake denoiser, the discriminator and their optimizers live here and are saved
    with the run's checkpoints (`save_state`), so a resumed stage continues where it stopped. Its first call warms
    the fake denoiser up on the student's images for `warmup` updates (from the teacher's weights it would give no
    gradient at first); the GAN term starts once the discriminator has taken `warmup` updates.

    Examples:
        ```py
        >>> loss_fn = DistributionMatchingLoss(teacher, teacher_scheduler.config, student_steps=4)
        >>> loss = loss_fn(student, student_scheduler, x0, torch.randn_like(x0), torch.randint(0, 1000, (8,)))
        >>> loss.backward()  # the student's gradient; the fake denoiser has already taken its steps
        ```
    """

    state_folder = FAKE_FOLDER  # in each checkpoint of the stage

    def __init__(self, teacher: torch.nn.Module, teacher_config: dict, student_steps: int,
                 mixed_precision: str = "no", fake_learning_rate: float = 1e-4, fake_updates: int = 2,
                 warmup: int = 100, gan_weight: float = GAN_WEIGHT) -> None:
        if teacher_config.get("prediction_type") not in ("epsilon", "v_prediction"):
            raise ValueError(f"the teacher predicts {teacher_config.get('prediction_type')!r}: distribution "
                             "matching needs an epsilon- or v-prediction teacher")
        self.teacher = teacher.eval().requires_grad_(False)
        self.fake = copy.deepcopy(teacher).train().requires_grad_(True)
        self.optimizer = torch.optim.AdamW(self.fake.parameters(), lr=fake_learning_rate, weight_decay=0.0)
        self.prediction_type = teacher_config["prediction_type"]
        self.num_train_timesteps = teacher_config["num_train_timesteps"]
        self.grid = [*trailing_timesteps(self.num_train_timesteps, student_steps), -1]
        self.fake_updates, self.warmup, self.warmed_up = fake_updates, warmup, False
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        self.gan_weight, self.discriminator, self.discriminator_updates = gan_weight, None, 0
        if gan_weight > 0:
            config = self.teacher.config
            self.discriminator = Discriminator(config.block_out_channels[-1], config.norm_num_groups)
            self.discriminator_optimizer = torch.optim.AdamW(
                self.discriminator.parameters(), lr=DISCRIMINATOR_LEARNING_RATE, weight_decay=0.0)
            self.teacher.mid_block.register_forward_hook(self._keep_features)

    def __call__(self, model: torch.nn.Module, noise_scheduler: DDPMScheduler, clean: torch.Tensor,
                 noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
        """The student's DMD loss on one batch of z_T = `noise`; then the fake denoiser's updates."""
        device = noise.device
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        self.teacher.to(device)
        self.fake.to(device)
        if not self.warmed_up:
            for _ in range(self.warmup):
                with torch.no_grad():
                    images = self.sample(model, noise, alphas_cumprod, clean.dtype)
                self.fake_step(images, alphas_cumprod)
            self.warmed_up = True

        # 1. the student's images: its n-step walk from pure noise, with gradients through the walk
        x = self.sample(model, noise, alphas_cumprod, clean.dtype)
        # 2. noised to a random level, denoised by the teacher (the data) and by the fake (the student's images);
        #    with the GAN, the teacher's features also say how real the discriminator finds the noised images
        low, high = (round(f * self.num_train_timesteps) for f in T_RANGE)
        t = torch.randint(low, high, (x.shape[0],), device=device)
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        z_t = alpha * x.detach() + sigma * torch.randn_like(x)
        judged = self.discriminator is not None and self.discriminator_updates >= self.warmup
        with torch.set_grad_enabled(judged), self._autocast(device):
            z_t.requires_grad_(judged)
            x0_real, _ = x0_predictor(self.teacher, alphas_cumprod, self.prediction_type)(z_t, t)
            if judged:
                seen = (t >= round(GAN_T_LOW * self.num_train_timesteps)).float()
                unreal = (F.softplus(-self.discriminator(self._features).float()) * seen).mean()
                (unreal_gradient,) = torch.autograd.grad(unreal, z_t)
        x0_real = x0_real.detach()
        with torch.no_grad(), self._autocast(device):
            x0_fake, _ = x0_predictor(self.fake, alphas_cumprod, self.prediction_type)(z_t.detach(), t)
        # 3. the KL gradient, normalised per image, as a loss whose gradient in x it is; plus the GAN's gradient,
        #    d unreal / dx = alpha_t d unreal / dz_t (added to the gradient, not to the loss's value)
        #    (with the GAN, only below GAN_T_LOW T: above it the real images decide)
        weight = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        gradient = torch.nan_to_num((x0_fake - x0_real) / weight) * self._matched(t).view(-1, 1, 1, 1)
        loss = 0.5 * F.mse_loss(x, (x - gradient).detach())
        if judged:
            gan = (x * (alpha * unreal_gradient).detach()).sum()
            loss = loss + self.gan_weight * (gan - gan.detach())
        # 4. the discriminator, then the fake denoiser, follow the student's new images
        if self.discriminator is not None:
            for _ in range(self.fake_updates):
                self.discriminator_step(x.detach(), clean, alphas_cumprod)
        for _ in range(self.fake_updates):
            self.fake_step(x.detach(), alphas_cumprod)
        return loss

    def _matched(self, t: torch.Tensor) -> torch.Tensor:
        """1 where the two denoisers' difference is the student's gradient at noise level `t`, else 0: every
        level without the GAN, the levels below the discriminator's with it."""
        if self.discriminator is None:
            return torch.ones_like(t, dtype=torch.float32)
        return (t < round(GAN_T_LOW * self.num_train_timesteps)).float()

    def sample(self, model: torch.nn.Module, noise: torch.Tensor, alphas_cumprod: torch.Tensor,
               dtype: torch.dtype) -> torch.Tensor:
        """The student's images: deterministic trailing DDIM from z_T = `noise`, as its pipeline samples it."""
        student = x0_predictor(model, alphas_cumprod, "v_prediction")
        z, n = noise.float(), noise.shape[0]
        for t_from, t_to in zip(self.grid[:-1], self.grid[1:], strict=True):
            t_from, t_to = (torch.full((n,), t, device=noise.device) for t in (t_from, t_to))
            z = ddim_step(*student(z.to(dtype), t_from), t_to, alphas_cumprod)
        return z

    def fake_step(self, images: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        """One denoising step of the fake denoiser on `images`, its gradient averaged over the processes."""
        t = torch.randint(0, self.num_train_timesteps, (images.shape[0],), device=images.device)
        eps = torch.randn_like(images)
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        with self._autocast(images.device, training=True):
            output = self.fake(alpha * images + sigma * eps, t).sample.float()
        target = alpha * eps - sigma * images if self.prediction_type == "v_prediction" else eps
        self.optimizer.zero_grad(set_to_none=True)
        F.mse_loss(output, target).backward()
        _average_over_processes(self.fake.parameters())
        self.optimizer.step()

    def discriminator_step(self, images: torch.Tensor, real: torch.Tensor, alphas_cumprod: torch.Tensor) -> None:
        """One classification step of the discriminator: the student's `images` against `real` ones, both noised
        to the same t >= GAN_T_LOW T and seen through the frozen teacher's bottleneck."""
        n = images.shape[0]
        t = torch.randint(round(GAN_T_LOW * self.num_train_timesteps), self.num_train_timesteps, (n,),
                          device=images.device)
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        z_t = torch.cat([alpha * images + sigma * torch.randn_like(images),
                         alpha * real.float() + sigma * torch.randn_like(images)])
        with torch.no_grad(), self._autocast(images.device):
            self.teacher(z_t, torch.cat([t, t]))  # for its bottleneck features
        logits = self.discriminator(self._features.float())
        self.discriminator_optimizer.zero_grad(set_to_none=True)
        (F.softplus(logits[:n]).mean() + F.softplus(-logits[n:]).mean()).backward()
        _average_over_processes(self.discriminator.parameters())
        self.discriminator_optimizer.step()
        self.discriminator_updates += 1

    def _keep_features(self, module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self._features = output  # the teacher's bottleneck, which the discriminator classifies

    def save_state(self, folder: Path) -> None:
        """The fake denoiser, the discriminator and their optimizers' moments into `folder` (safetensors), with
        each checkpoint."""
        folder.mkdir(parents=True, exist_ok=True)
        weights, moments = dict(self.fake.state_dict()), _moments(self.optimizer)
        if self.discriminator is not None:
            weights |= {DISCRIMINATOR + k: v for k, v in self.discriminator.state_dict().items()}
            moments |= {DISCRIMINATOR + k: v for k, v in _moments(self.discriminator_optimizer).items()}
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / FAKE_WEIGHTS)
        counters = {"warmed_up": torch.tensor(self.warmed_up), "updates": torch.tensor(self.discriminator_updates)}
        save_file({**moments, **counters}, folder / FAKE_OPTIMIZER)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote: a resumed stage goes on with the same fake denoiser and discriminator."""
        weights, saved = load_file(folder / FAKE_WEIGHTS), load_file(folder / FAKE_OPTIMIZER)
        self.warmed_up, self.discriminator_updates = bool(saved.pop("warmed_up")), int(saved.pop("updates"))
        self.fake.load_state_dict({k: v for k, v in weights.items() if not k.startswith(DISCRIMINATOR)})
        _load_moments(self.optimizer, {k: v for k, v in saved.items() if not k.startswith(DISCRIMINATOR)})
        if self.discriminator is not None:
            self.discriminator.load_state_dict(_unprefixed(weights))
            _load_moments(self.discriminator_optimizer, _unprefixed(saved))

    def _autocast(self, device: torch.device, training: bool = False) -> torch.autocast:
        """The student's autocast for the two denoisers; the fake learns in bf16 or float32 (fp16 gradients would
        need a loss scaler of their own)."""
        dtype = self.autocast_dtype
        enabled = dtype is not None and (dtype == torch.bfloat16 or (device.type == "cuda" and not training))
        return torch.autocast(device.type, dtype=dtype, enabled=enabled)  # fp16: CUDA only


def _average_over_processes(parameters: Iterable[torch.nn.Parameter]) -> None:
    """Average the gradients over the processes of a launch: the stage's own networks are one on every process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in parameters:
            dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)


def _moments(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """An optimizer's per-parameter state as flat tensors, `"<index>.<name>"`, for safetensors."""
    return {f"{i}.{k}": torch.as_tensor(v) for i, state in optimizer.state_dict()["state"].items()
            for k, v in state.items()}


def _load_moments(optimizer: torch.optim.Optimizer, saved: dict[str, torch.Tensor]) -> None:
    moments: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in saved.items():
        index, name = key.split(".", 1)
        moments.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({**optimizer.state_dict(), "state": moments})


def _unprefixed(saved: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removeprefix(DISCRIMINATOR): v for k, v in saved.items() if k.startswith(DISCRIMINATOR)}
