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
The student stays an ordinary v-prediction `UNet2DModel` sampled by stock trailing DDIM in its n steps.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file

from punkdiff.training.distillation import alpha_sigma, ddim_step, trailing_timesteps, x0_predictor

# The stage's length for a teacher trained 5,200 steps or more (`default_dmd_steps`).
DEFAULT_DMD_STEPS = 400
# The student's learning rate in the stage, constant: DMD's small steps (the student starts close to its teacher).
DMD_LEARNING_RATE = 1e-5
# What a checkpoint holds of the stage's fake denoiser, in its `FAKE_FOLDER`.
FAKE_FOLDER, FAKE_WEIGHTS, FAKE_OPTIMIZER = "fake_denoiser", "weights.safetensors", "optimizer.safetensors"
# The noise levels at which the two denoisers are compared: DMD's [0.02 T, 0.98 T).
T_RANGE = (0.02, 0.98)


def default_dmd_steps(teacher_training_steps: int) -> int:
    """Optimizer steps of the distribution-matching stage without `--dmd-steps`: 400 (measured on `mnist-16` and
    `punks-24-cpu`, whose teachers trained 5,200 and 15,000 steps), or 1/13 of a teacher's that trained fewer than
    5,200. A step (the student's whole walk with gradients, two denoisers, two fake updates) costs several training
    steps; `benchmarks/bench_distill.py` times it (docs/few-step.md).

    Examples:
        ```py
        >>> default_dmd_steps(15000), default_dmd_steps(5200), default_dmd_steps(1300)
        (400, 400, 100)
        ```
    """
    return min(DEFAULT_DMD_STEPS, max(1, teacher_training_steps // 13))


class DistributionMatchingLoss:
    """The loss of the distribution-matching stage, called as the training loop calls its loss.

    Only the loop's `noise` is used (as the student's z_T); `clean`, `timesteps` and `snr_gamma` are not. The fake
    denoiser and its optimizer live here and are saved with the run's checkpoints (`save_state`), so a resumed
    stage continues where it stopped. Its first call warms the fake denoiser up on the student's images for
    `warmup` updates (from the teacher's weights it would give no gradient at first).

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
                 warmup: int = 100) -> None:
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
        # 2. noised to a random level, denoised by the teacher (the data) and by the fake (the student's images)
        low, high = (round(f * self.num_train_timesteps) for f in T_RANGE)
        t = torch.randint(low, high, (x.shape[0],), device=device)
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        z_t = alpha * x.detach() + sigma * torch.randn_like(x)
        with torch.no_grad(), self._autocast(device):
            x0_real, _ = x0_predictor(self.teacher, alphas_cumprod, self.prediction_type)(z_t, t)
            x0_fake, _ = x0_predictor(self.fake, alphas_cumprod, self.prediction_type)(z_t, t)
        # 3. the KL gradient, normalised per image, as a loss whose gradient in x it is
        weight = (x.detach() - x0_real).abs().mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
        gradient = torch.nan_to_num((x0_fake - x0_real) / weight)
        loss = 0.5 * F.mse_loss(x, (x - gradient).detach())
        # 4. the fake denoiser follows the student's new images
        for _ in range(self.fake_updates):
            self.fake_step(x.detach(), alphas_cumprod)
        return loss

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
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:  # one fake on every process
            for p in self.fake.parameters():
                dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
        self.optimizer.step()

    def save_state(self, folder: Path) -> None:
        """The fake denoiser and its optimizer's moments into `folder` (safetensors), with each checkpoint."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.fake.state_dict().items()}, folder / FAKE_WEIGHTS)
        moments = {f"{i}.{k}": torch.as_tensor(v) for i, state in self.optimizer.state_dict()["state"].items()
                   for k, v in state.items()}
        save_file({**moments, "warmed_up": torch.tensor(self.warmed_up)}, folder / FAKE_OPTIMIZER)

    def load_state(self, folder: Path) -> None:
        """Restore what `save_state` wrote: a resumed stage goes on with the same fake denoiser."""
        self.fake.load_state_dict(load_file(folder / FAKE_WEIGHTS))
        saved = load_file(folder / FAKE_OPTIMIZER)
        self.warmed_up = bool(saved.pop("warmed_up"))
        moments: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in saved.items():
            index, name = key.split(".", 1)
            moments.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({**self.optimizer.state_dict(), "state": moments})

    def _autocast(self, device: torch.device, training: bool = False) -> torch.autocast:
        """The student's autocast for the two denoisers; the fake learns in bf16 or float32 (fp16 gradients would
        need a loss scaler of their own)."""
        dtype = self.autocast_dtype
        enabled = dtype is not None and (dtype == torch.bfloat16 or (device.type == "cuda" and not training))
        return torch.autocast(device.type, dtype=dtype, enabled=enabled)  # fp16: CUDA only
