"""Progressive distillation's target: one student step lands where two teacher DDIM steps land."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny_models import tiny_unet

from punkdiff.pipelines.punkdiff_pipeline import ExactDDIMScheduler
from punkdiff.training.distillation import (
    DistillationError,
    distillation_stages,
    student_v_target,
    trailing_timesteps,
    x0_predictor,
)


@pytest.mark.parametrize("schedule", [
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"},
    {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
    {"beta_schedule": "linear", "prediction_type": "epsilon"},
])
@pytest.mark.parametrize("teacher_steps", [8, 16])
def test_a_student_predicting_the_target_samples_the_teachers_images_in_half_the_steps(schedule, teacher_steps):
    """The oracle student (v = the target), DDIM in n/2 steps without clipping, equals the clipping teacher in n."""
    torch.manual_seed(0)
    teacher = tiny_unet(1, 8, seed=1).eval()
    train_sched = DDPMScheduler(num_train_timesteps=1000, **schedule)
    alphas_cumprod = train_sched.alphas_cumprod
    predict = x0_predictor(teacher, alphas_cumprod, schedule["prediction_type"], train_sched.config.clip_sample_range)
    x_T = torch.randn(3, 1, 8, 8)

    def sample(steps: int, prediction_type: str, model, clip: bool) -> torch.Tensor:
        sched = ExactDDIMScheduler.from_config(
            train_sched.config, prediction_type=prediction_type, timestep_spacing="trailing", clip_sample=clip)
        sched.set_timesteps(steps)
        z = x_T.clone()
        for t in sched.timesteps:
            z = sched.step(model(z, t), t, z, eta=0.0).prev_sample
        return z

    with torch.no_grad():
        by_teacher = sample(teacher_steps, schedule["prediction_type"], lambda z, t: teacher(z, t).sample, True)
        grid = trailing_timesteps(1000, teacher_steps) + [-1]

        def oracle_student(z, t):
            i = grid.index(int(t))
            b = torch.full((z.shape[0],), 1, dtype=torch.long)
            return student_v_target(predict, z, [b * grid[i], b * grid[i + 1], b * grid[i + 2]], alphas_cumprod)

        by_student = sample(teacher_steps // 2, "v_prediction", oracle_student, False)
    assert by_teacher.abs().max() > 0.1  # a real image, not zeros
    torch.testing.assert_close(by_student, by_teacher, atol=2e-4, rtol=1e-4)


def test_with_factor_4_the_loss_targets_the_teachers_four_steps_and_an_oracle_student_samples_them_in_one():
    """DistillationLoss(factor=4): the student's loss is zero exactly when it predicts the 4-teacher-step target."""
    from punkdiff.training.distillation import DistillationLoss

    torch.manual_seed(0)
    teacher = tiny_unet(1, 8, seed=1).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          clip_sample=False)
    loss_fn = DistillationLoss(teacher, dict(sched.config), student_steps=2, factor=4)
    assert loss_fn.path.tolist() == [[999, 499], [874, 374], [749, 249], [624, 124], [499, -1]]
    predict = x0_predictor(teacher, sched.alphas_cumprod, "v_prediction")
    x0, noise = torch.rand(2, 1, 8, 8) * 2 - 1, torch.randn(2, 1, 8, 8)
    timesteps = torch.tensor([100, 700])  # student steps 0 (t = 999) and 1 (t = 499)

    class Oracle(torch.nn.Module):  # the exact target, whatever z_t it is given
        def forward(self, z, t):
            path = [loss_fn.path[j, (t == 499).long()] for j in range(5)]
            return type("Out", (), {"sample": student_v_target(predict, z, path, sched.alphas_cumprod)})()

    with torch.no_grad():
        assert loss_fn(Oracle(), sched, x0, noise, timesteps).item() < 1e-10
        assert loss_fn(lambda z, t: type("Out", (), {"sample": torch.zeros_like(z)})(), sched, x0, noise,
                       timesteps).item() > 1e-3


@pytest.mark.parametrize(("mixed_precision", "dtype"), [("no", torch.float32), ("bf16", torch.bfloat16),
                                                      ("fp16", torch.float32)])  # fp16: CUDA only, float32 on a CPU
def test_the_teacher_walks_in_the_students_mixed_precision_and_its_target_stays_float32_close(mixed_precision, dtype):
    """The teacher's forward passes run in the student's autocast; the bf16 target is within 1% of the float32 one."""
    from punkdiff.training.distillation import DistillationLoss

    torch.manual_seed(0)
    teacher = tiny_unet(1, 8, seed=1).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    seen = []
    teacher.conv_in.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    x0, noise, timesteps = torch.rand(4, 1, 8, 8) * 2 - 1, torch.randn(4, 1, 8, 8), torch.tensor([100, 300, 600, 900])
    zero_student = lambda z, t: type("Out", (), {"sample": torch.zeros_like(z)})()  # noqa: E731 - loss = mean(v~^2)
    with torch.no_grad():
        exact = DistillationLoss(teacher, dict(sched.config), 4, 4, "dpm-solver-2m")(
            zero_student, sched, x0, noise, timesteps)
        seen.clear()
        mixed = DistillationLoss(teacher, dict(sched.config), 4, 4, "dpm-solver-2m", mixed_precision)(
            zero_student, sched, x0, noise, timesteps)
    assert seen == [dtype] * 4  # the 4 teacher steps, each in the autocast dtype
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, exact, rtol=1e-2, atol=0)
    assert (mixed != exact) == (dtype == torch.bfloat16)


def test_the_trailing_grid_is_diffusers_own_where_the_step_count_divides_the_training_steps():
    """Stock DDIMScheduler with "trailing" spacing samples the student's steps exactly as the export records them."""
    for steps in (1, 2, 4, 8):
        stock = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
        stock.set_timesteps(steps)
        assert stock.timesteps.tolist() == trailing_timesteps(1000, steps)


def test_student_grids_nest_in_the_teachers():
    for n in (64, 32, 16, 8, 4, 2):
        teacher, student = trailing_timesteps(1000, n), trailing_timesteps(1000, n // 2)
        assert teacher[::2] == student


def test_stages_and_the_step_counts_they_cannot_reach():
    assert distillation_stages(64, 4, factor=2) == [32, 16, 8, 4]
    assert distillation_stages(8, 1, factor=2) == [4, 2, 1]
    assert distillation_stages(16, 4) == [4]  # one stage by default
    with pytest.raises(DistillationError, match="does not divide the teacher's 16 steps: choose one of 8, 4, 2, 1"):
        distillation_stages(16, 3)
    with pytest.raises(DistillationError, match="not reachable by halving.*choose one of 32, 16, 8, 4, 2, 1"):
        distillation_stages(64, 3, factor=2)
    assert distillation_stages(64, 4, factor=4) == [16, 4]
    with pytest.raises(DistillationError, match="not reachable by dividing by 4.*choose one of 16, 4, 1"):
        distillation_stages(64, 8, factor=4)
    with pytest.raises(DistillationError, match="below the teacher's 8"):
        distillation_stages(8, 8)
    with pytest.raises(DistillationError, match="needs an epsilon- or v-prediction teacher"):
        x0_predictor(tiny_unet(1, 8), DDPMScheduler().alphas_cumprod, "sample")


@pytest.mark.parametrize("solver", ["dpm-solver-2", "dpm-solver-2m"])
def test_second_order_teacher_walks_land_closer_to_the_exact_path_than_ddim_on_the_same_evaluations(solver):
    """teacher_walk from t = 600 to 200 in 4 network evaluations: the second-order walks' error against a 256-step
    DDIM walk (the ODE solved finely) is well below DDIM's own at 4 steps."""
    from punkdiff.training.distillation import teacher_walk

    torch.manual_seed(0)
    teacher = tiny_unet(1, 8, seed=1).eval()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    predict = x0_predictor(teacher, sched.alphas_cumprod, "v_prediction")
    z = torch.randn(4, 1, 8, 8)

    def walk(steps: int, how: str) -> torch.Tensor:
        grid = [round(600 - 400 * k / steps) for k in range(steps + 1)]  # 600 -> 200
        return teacher_walk(predict, z, [torch.full((4,), t) for t in grid], sched.alphas_cumprod, how)

    exact = walk(256, "ddim")
    ddim_error = (walk(4, "ddim") - exact).abs().max()
    assert ddim_error > 1e-3  # a path DDIM does not solve exactly in 4 steps
    assert (walk(4, solver) - exact).abs().max() < ddim_error / 3
    with pytest.raises(DistillationError, match="even number"):
        walk(3, "dpm-solver-2")
