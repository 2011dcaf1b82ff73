"""Progressive distillation (Salimans & Ho 2022): a student that takes one DDIM step where its teacher takes two
(or k: `factor`, the teacher's steps per student step).

Notation (paper -> names): z_t = alpha_t x + sigma_t eps with alpha_t = sqrt(alpha_bar_t) (`alpha`), sigma_t =
sqrt(1 - alpha_bar_t) (`sigma`); the teacher's two deterministic DDIM steps t -> t' -> t'' (Algorithm 2, the
"2 steps of DDIM with teacher" lines; with factor k, k steps) land on z_{t''}; the student's one step t -> t'' lands
there too when it
predicts x~ = (z_{t''} - (sigma_{t''} / sigma_t) z_t) / (alpha_{t''} - (sigma_{t''} / sigma_t) alpha_t). The student
is trained in v-prediction (v = alpha_t eps - sigma_t x), whose MSE is the paper's "SNR + 1" weighting of the x error.

Timesteps are the exact "trailing" DDIM timesteps of `punkdiff.pipelines` (t_k = round(T k / n) - 1), which nest:
the student's n / k timesteps are every k-th one of the teacher's n, and the last step of each lands on
alpha_bar = 1 (the clean image), as DDIM with `set_alpha_to_one` samples it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
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


def distillation_stages(teacher_steps: int, student_steps: int, factor: int = 0) -> list[int]:
    """The step counts the students go through, each 1 / factor of the last, down to student_steps: factor 2 is
    progressive distillation's halving (64 -> 32 -> 16 -> 8 -> 4), factor 0 one stage (teacher_steps -> student_steps).

    Examples:
        ```py
        >>> distillation_stages(64, 4, factor=2)
        [32, 16, 8, 4]
        >>> distillation_stages(16, 4)
        [4]
        ```
    """
    if student_steps < 1 or teacher_steps <= student_steps:
        raise DistillationError(
            f"--steps {student_steps} must be at least 1 and below the teacher's {teacher_steps} sampling steps")
    if factor == 0:
        if teacher_steps % student_steps:
            raise DistillationError(
                f"--steps {student_steps} does not divide the teacher's {teacher_steps} steps: choose one of "
                f"{', '.join(str(n) for n in range(teacher_steps - 1, 0, -1) if teacher_steps % n == 0)}, or "
                "another --teacher-steps")
        return [student_steps]
    if factor < 2:
        raise DistillationError(f"--stage-factor {factor} must be 0 (one stage) or at least 2 (teacher steps per "
                                "student step)")
    reachable, n = [], teacher_steps
    while n % factor == 0:
        n //= factor
        reachable.append(n)
    if student_steps not in reachable:
        how = "halving" if factor == 2 else f"dividing by {factor}"
        raise DistillationError(
            f"--steps {student_steps} is not reachable by {how} the teacher's {teacher_steps} steps: choose one of "
            f"{', '.join(map(str, reachable)) or 'none'}, or another --teacher-steps")
    return reachable[:reachable.index(student_steps) + 1]


def default_stage_steps(teacher_training_steps: int, num_stages: int) -> int:
    """Optimizer steps per stage without `--max-steps`: 2/5 of the teacher's, shared out over the stages. A step
    with the default teacher walk (8 steps per student step, bf16) costs about 3 training steps
    (`benchmarks/bench_distill.py`), so a distillation takes about 1.2x its teacher's training time; the students
    measured as well as ones trained 9/10 of the teacher's steps on a 16-step walk (docs/few-step.md).

    Examples:
        ```py
        >>> default_stage_steps(5200, 1)
        2080
        ```
    """
    return max(1, teacher_training_steps * 2 // (5 * num_stages))


def alpha_sigma(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """alpha_t, sigma_t per image, shaped to broadcast over [B, C, H, W]; t = -1 is the clean image (alpha 1)."""
    alpha_bar = torch.where(t >= 0, alphas_cumprod[t.clamp(min=0)], torch.ones_like(alphas_cumprod[0]))
    alpha_bar = alpha_bar.view(-1, 1, 1, 1)
    return alpha_bar.sqrt(), (1 - alpha_bar).clamp(min=0).sqrt()


def ddim_step(x0: torch.Tensor, eps: torch.Tensor, s: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Deterministic DDIM (eta 0) to timestep s from the predicted x and eps: z_s = alpha_s x + sigma_s eps."""
    alpha_s, sigma_s = alpha_sigma(alphas_cumprod, s)
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
            f"the teacher predicts {prediction_type!r}: distillation needs an epsilon- or "
            "v-prediction teacher")

    def predict(z_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        output = unet(z_t, t).sample.float()
        alpha_bar = alphas_cumprod[t].view(-1, 1, 1, 1).float()
        x0, eps = predicted_x0_and_epsilon(output, z_t.float(), alpha_bar, prediction_type)
        return (x0 if clip_sample_range is None else x0.clamp(-clip_sample_range, clip_sample_range)), eps

    return predict


def data_step(x0: torch.Tensor, z_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The exponential-integrator step s -> t with x_0 held at `x0`: z_t = (sigma_t / sigma_s) z_s + (alpha_t -
    (sigma_t / sigma_s) alpha_s) x0. With x0 the network's own prediction at (z_s, s) this is deterministic DDIM."""
    alpha_s, sigma_s = alpha_sigma(alphas_cumprod, s)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, t)
    ratio = sigma_t / sigma_s
    return ratio * z_s + (alpha_t - ratio * alpha_s) * x0


def dpm_solver_2s_step(teacher: Predictor, z_s: torch.Tensor, s: torch.Tensor, s_mid: torch.Tensor, t: torch.Tensor,
                       alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """One second-order step s -> t through the intermediate timestep s_mid, two network evaluations:
    DPM-Solver++(2S) (Lu et al. 2022, Algorithm 1 with data prediction), with r = (lambda_mid - lambda_s) /
    (lambda_t - lambda_s) in lambda = log(alpha / sigma). Landing on the clean image (t = -1, lambda = inf), x_0 is
    the prediction at s_mid."""
    x0_s, _ = teacher(z_s, s)
    z_mid = data_step(x0_s, z_s, s, s_mid, alphas_cumprod)
    x0_mid, _ = teacher(z_mid, s_mid)
    lam_s, lam_mid, lam_t = (_lambda(alphas_cumprod, u) for u in (s, s_mid, t))
    final = t.view(-1, 1, 1, 1) < 0
    r = torch.where(final, 0.5, (lam_mid - lam_s) / torch.where(final, 1.0, lam_t - lam_s))
    x0 = torch.where(final, x0_mid, (1 - 0.5 / r) * x0_s + (0.5 / r) * x0_mid)
    return data_step(x0, z_s, s, t, alphas_cumprod)


def _lambda(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """lambda_t = log(alpha_t / sigma_t), shaped to broadcast; finite placeholder 0 for the clean image (t = -1)."""
    alpha, sigma = alpha_sigma(alphas_cumprod, t)
    return torch.where(t.view(-1, 1, 1, 1) < 0, 0.0, (alpha / sigma.clamp(min=1e-12)).log())


TEACHER_SOLVERS = ("ddim", "dpm-solver-2", "dpm-solver-2m")


@torch.no_grad()
def teacher_walk(teacher: Predictor, z: torch.Tensor, path: Sequence[torch.Tensor], alphas_cumprod: torch.Tensor,
                 solver: str = "ddim") -> torch.Tensor:
    """The teacher's deterministic walk along `path` (t, t', ..., t''): "ddim", one DDIM step per interval;
    "dpm-solver-2m", one DPM-Solver++ 2M step per interval; "dpm-solver-2", one 2S step per two intervals. The
    second-order walks take the same network evaluations as DDIM with a far smaller error."""
    if solver == "ddim":
        for t_from, t_to in itertools.pairwise(path):
            z = ddim_step(*teacher(z, t_from), t_to, alphas_cumprod)
        return z
    if solver == "dpm-solver-2m":  # Lu et al. 2022, Algorithm 2: second order from the last step's x_0
        x0_prev, lam_prev = None, None
        for t_from, t_to in itertools.pairwise(path):
            x0, _ = teacher(z, t_from)
            lam_s, lam_t = _lambda(alphas_cumprod, t_from), _lambda(alphas_cumprod, t_to)
            x0_used = x0
            if x0_prev is not None:  # the last step, onto the clean image (lambda = inf), stays first order
                final = t_to.view(-1, 1, 1, 1) < 0
                half_r = torch.where(final, 0.0, (lam_t - lam_s) / (2 * (lam_s - lam_prev)))  # 1 / (2 r)
                x0_used = (1 + half_r) * x0 - half_r * x0_prev
            z = data_step(x0_used, z, t_from, t_to, alphas_cumprod)
            x0_prev, lam_prev = x0, lam_s
        return z
    if solver != "dpm-solver-2" or (len(path) - 1) % 2:
        raise DistillationError(f"teacher solver {solver!r} on {len(path) - 1} steps: use one of {TEACHER_SOLVERS}, "
                                "dpm-solver-2 with an even number of teacher steps per student step")
    for j in range(0, len(path) - 1, 2):
        z = dpm_solver_2s_step(teacher, z, path[j], path[j + 1], path[j + 2], alphas_cumprod)
    return z


@torch.no_grad()
def student_v_target(
    teacher: Predictor,
    z_t: torch.Tensor,
    path: Sequence[torch.Tensor],
    alphas_cumprod: torch.Tensor,
    solver: str = "ddim",
) -> torch.Tensor:
    """The v the student must predict at (z_t, t) so that its one DDIM step lands where the teacher's walk does.

    `path` is the teacher's timesteps t, t', ..., t'' (t'' = -1 for the clean image): two DDIM steps in Algorithm 2
    of Salimans & Ho, more with a larger factor (`teacher_walk`). The x target is turned into v:
    eps~ = (z_t - alpha_t x~) / sigma_t, v~ = alpha_t eps~ - sigma_t x~.
    """
    z = teacher_walk(teacher, z_t, path, alphas_cumprod, solver)
    alpha_t, sigma_t = alpha_sigma(alphas_cumprod, path[0])
    alpha_next, sigma_next = alpha_sigma(alphas_cumprod, path[-1])
    ratio = sigma_next / sigma_t
    x_target = (z - ratio * z_t) / (alpha_next - ratio * alpha_t)
    eps_target = (z_t - alpha_t * x_target) / sigma_t
    return alpha_t * eps_target - sigma_t * x_target


class DistillationLoss:
    """The training loss of one distillation stage: MSE between the student's v and `student_v_target`.

    Called as the training loop calls its loss, `loss(model, noise_scheduler, x_0, eps, timesteps)`: the loop's
    uniform draw of t in [0, T) picks the student's timestep index i = floor(t n / T), so the draws (and exact
    resume) are the loop's own. `z_t` is noised at the student's t_i; the teacher (frozen) takes its `factor` DDIM
    steps t_i -> t' -> ... -> t_{i+1} (two in progressive distillation), in `mixed_precision` as the student trains.

    Examples:
        ```py
        >>> loss_fn = DistillationLoss(teacher, teacher_scheduler.config, student_steps=4)
        >>> loss = loss_fn(student, student_scheduler, x0, torch.randn_like(x0), torch.randint(0, 1000, (8,)))
        ```
    """

    def __init__(self, teacher: torch.nn.Module, teacher_config: dict, student_steps: int, factor: int = 2,
                 solver: str = "ddim", mixed_precision: str = "no") -> None:
        self.check_solver(solver, factor)
        # the teacher's forward passes run in the student's autocast: bf16 targets differ from float32 ones by
        # about 1/100 of a trained student's error (docs/few-step.md) and cost half the time on a CPU with AMX
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        T, k, self.solver = teacher_config["num_train_timesteps"], factor, solver
        grid = trailing_timesteps(T, k * student_steps) + [-1]
        self.num_train_timesteps, self.student_steps = T, student_steps
        # path[j][i]: the j-th timestep of the teacher's walk from the student's t_i (j = 0) to t_{i+1} (j = k)
        self.path = torch.tensor([grid[j:k * student_steps + j:k] for j in range(k + 1)])
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_config = dict(teacher_config)

    @staticmethod
    def check_solver(solver: str, factor: int) -> None:
        """Refuse a teacher walk that cannot be taken, before any work: dpm-solver-2 pairs the teacher's steps."""
        if solver not in TEACHER_SOLVERS or (solver == "dpm-solver-2" and factor % 2):
            raise DistillationError(f"--teacher-solver {solver} with --stage-factor {factor}: use one of "
                                    f"{', '.join(TEACHER_SOLVERS)}, dpm-solver-2 with an even factor")

    @staticmethod
    def check_teacher(teacher_config: dict) -> None:
        """Refuse a teacher distillation cannot use, before any work (the DDIM step needs x_0 and eps)."""
        if teacher_config.get("prediction_type") not in ("epsilon", "v_prediction"):
            raise DistillationError(
                f"the teacher predicts {teacher_config.get('prediction_type')!r}: distillation needs an "
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
        path = self.path[:, index].to(device)
        t = path[0]
        alpha, sigma = alpha_sigma(alphas_cumprod, t)
        z_t = alpha * clean.float() + sigma * noise.float()
        clip = self.teacher_config.get("clip_sample_range", 1.0) if self.teacher_config.get("clip_sample") else None
        teacher = x0_predictor(self.teacher.to(device), alphas_cumprod, self.teacher_config["prediction_type"], clip)
        autocast = self.autocast_dtype is not None and (device.type == "cuda" or self.autocast_dtype == torch.bfloat16)
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=autocast):  # fp16: CUDA only
            target = student_v_target(teacher, z_t, path, alphas_cumprod, self.solver)
        prediction = model(z_t.to(clean.dtype), t).sample
        return F.mse_loss(prediction.float(), target)
