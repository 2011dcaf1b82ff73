"""Progressive distillation (Salimans & Ho 2022): a student that takes one DDIM step where its teacher takes two.

Notation (paper -> names): z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(alpha_bar_t) (`alpha`), sigma_t =
sqrt(1 - alpha_bar_t) (`sigma`); the teacher's two deterministic DDIM steps t -> t' -> t'' (Algorithm 2, the
"2 steps of DDIM with teacher" lines) land on z_{t''}; the student's one step t -> t'' lands there too when it
predicts x~ = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t). The student
is trained in v-prediction (v = alpha_t eps - sigma_t x), whose MSE is the paper's "SNR + 1" weighting of the x error.

Timesteps are the exact "trailing" DDIM timesteps of `punkdiff.pipelines` (t_k = round(T k / n) - 1), which nest:
the student's n / 2 timesteps are every other one of the teacher's n, and the last step of each lands on
alpha_bar = 1 (the clean image), as DDIM with `set_alpha_to_one` samples it.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from punkdiff.pipelines.punkdiff_pipeline import predicted_x0_and_epsilon

# (x_0, eps) predicted by a network at (z_t, t): what the teacher's DDIM step needs, whatever it was trained on.
Predictor = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class DistillationError(ValueError):
    """A distillation that cannot work as asked (a step count not reachable by halving, a wrong teacher)."""


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """The exact "trailing" DDIM timesteps, noisiest first: t_k = round(T k / n) - 1 for k = n .. 1.

    Examples:
        ```py
        >>> trailing_timesteps(1000, 4)
        [999, 749, 499, 249]
        ```
    """
    T, n = num_train_timesteps, num_steps
    return [round(Fraction(T * k, n)) - 1 for k in range(n, 0, -1)]


def halving_stages(teacher_steps: int, student_steps: int) -> list[int]:
    """The step counts the students go through, teacher_steps / 2 down to student_steps, each half the last.

    Examples:
        ```py
        >>> halving_stages(64, 4)
        [32, 16, 8, 4]
        ```
    """
    if student_steps < 1 or teacher_steps <= student_steps:
        raise DistillationError(
            f"--steps {student_steps} must be at least 1 and below the teacher's {teacher_steps} sampling steps")
    reachable, n = [], teacher_steps
    while n % 2 == 0:
        n //= 2
        reachable.append(n)
    if student_steps not in reachable:
        raise DistillationError(
            f"--steps {student_steps} is not reachable by halving the teacher's {teacher_steps} steps: choose one of "
            f"{', '.join(map(str, reachable)) or 'none (the teacher step count is odd)'}, or another --teacher-steps")
    return reachable[:reachable.index(student_steps) + 1]


def _alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t per image, shaped to broadcast over [B, C, H, W]; t = -1 is the clean image (alpha 1)."""
    alpha_bar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(alphas_cumprod[0]))
    alpha_bar = alpha_bar.view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).clamp(min=0).sqrt()


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) to timestep s from the predicted x and eps: z_s = alpha_s x + sigma_s eps."""
    alpha_s, sigma_s = _alpha_sigma(alphas_cumprod, s)
    return alpha_s * x0 + sigma_s * eps


def x0_predictor(
    unet: torch.nn.Module, alphas_cumprod: torch.Tensor, prediction_type: str, clip_sample_range: float | None = None
) -> Predictor:
    """The teacher as its DDIM sampler sees it: x_0 (clipped as its scheduler clips) and eps from its output.

    As in diffusers' DDIM step, eps is the model's own, not re-derived from the clipped x_0. The student then
    reproduces the teacher's sampler, clipping included, and samples without clipping itself (its x target at
    high noise is not an image and may leave [-1, 1]).
    """
    if prediction_type not in ("epsilon", "v_prediction"):
        raise DistillationError(
            f"the teacher predicts {prediction_type!r}: progressive distillation needs an epsilon- or "
            "v-prediction teacher")

    def predict(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = unet(z_t, t).sample.float()
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x0, eps = predicted_x0_and_epsilon(output, z_t.float(), alpha_bar, prediction_type)
        return (x0 if clip_sample_range is None else x0.clamp(-clip_sample_range, clip_sample_range)), eps

    return predict


@torch.no_grad()
def student_v_target(
    teacher: Predictor,
    z_t: torch.Tensor,
    t: torch.Tensor,
    t_mid: torch.Tensor,
    t_next: torch.Tensor,
    alphas_cumprod: torch.Tensor,
) -> torch.Tensor:
    """The v the student must predict at (z_t, t) so that its one DDIM step lands where the teacher's two do.

    `t_mid` is t' and `t_next` is t'' (-1 for the clean image). Algorithm 2 of Salimans & Ho, with the x target
    turned into v: eps~ = (z_t - alpha_t x~) / sigma_t, v~ = alpha_t eps~ - sigma_t x~.
    """
    z_mid = ddim_step(*teacher(z_t, t), t_mid, alphas_cumprod)
    z_next = ddim_step(*teacher(z_mid, t_mid), t_next, alphas_cumprod)
    alpha_t, sigma_t = _alpha_sigma(alphas_cumprod, t)
    alpha_next, sigma_next = _alpha_sigma(alphas_cumprod, t_next)
    ratio = sigma_next / sigma_t
    x_target = (z_next - ratio * z_t) / (alpha_next - ratio * alpha_t)
    eps_target = (z_t - alpha_t * x_target) / sigma_t
    return alpha_t * eps_target - sigma_t * x_target


class DistillationLoss:
    """The training loss of one distillation stage: MSE between the student's v and `student_v_target`.

    Called as the training loop calls its loss, `loss(model, noise_scheduler, x_0, eps, timesteps)`: the loop's
    uniform draw of t in [0, T) picks the student's timestep index i = floor(t n / T), so the draws (and exact
    resume) are the loop's own. `z_t` is noised at the student's t_i; the teacher (frozen, fp32) takes the two DDIM
    steps t_i -> t' -> t_{i+1}.

    Examples:
        ```py
        >>> loss_fn = DistillationLoss(teacher, teacher_scheduler.config, student_steps=4)
        >>> loss = loss_fn(student, student_scheduler, x0, torch.randn_like(x0), torch.randint(0, 1000, (8,)))
        ```
    """

    def __init__(self, teacher: torch.nn.Module, teacher_config: dict, student_steps: int) -> None:
        T = teacher_config["num_train_timesteps"]
        grid = trailing_timesteps(T, 2 * student_steps) + [-1]
        self.num_train_timesteps, self.student_steps = T, student_steps
        self.t, self.t_mid, self.t_next = (torch.tensor(grid[i:2 * student_steps + 1:2][:student_steps])
                                           for i in (0, 1, 2))
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_config = dict(teacher_config)

    @staticmethod
    def check_teacher(teacher_config: dict) -> None:
        """Refuse a teacher progressive distillation cannot use, before any work (the DDIM step needs x_0 and eps)."""
        if teacher_config.get("prediction_type") not in ("epsilon", "v_prediction"):
            raise DistillationError(
                f"the teacher predicts {teacher_config.get('prediction_type')!r}: progressive distillation needs an "
                "epsilon- or v-prediction teacher")
        if teacher_config.get("thresholding"):
            raise DistillationError("the teacher's scheduler uses dynamic thresholding, which the student's DDIM "
                                    "step cannot reproduce: distil a teacher without it")

    def __call__(self, model: torch.nn.Module, noise_scheduler: DDPMScheduler, clean: torch.Tensor,
                 noise: torch.Tensor, timesteps: torch.Tensor, snr_gamma: float | None = None) -> torch.Tensor:
        """The stage's loss on one batch; `snr_gamma` is ignored (the v error already weighs x by SNR + 1)."""
        device = clean.device
        alphas_cumprod = noise_scheduler.alphas_cumprod.to(device)
        index = (timesteps * self.student_steps // self.num_train_timesteps).cpu()
        t, t_mid, t_next = (grid[index].to(device) for grid in (self.t, self.t_mid, self.t_next))
        alpha, sigma = _alpha_sigma(alphas_cumprod, t)
        z_t = alpha * clean.float() + sigma * noise.float()
        clip = self.teacher_config.get("clip_sample_range", 1.0) if self.teacher_config.get("clip_sample") else None
        teacher = x0_predictor(self.teacher.to(device), alphas_cumprod, self.teacher_config["prediction_type"], clip)
        target = student_v_target(teacher, z_t, t, t_mid, t_next, alphas_cumprod)
        prediction = model(z_t.to(clean.dtype), t).sample
        return F.mse_loss(prediction.float(), target)
