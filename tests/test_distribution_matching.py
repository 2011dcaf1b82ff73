"""Distribution matching (DMD): the student's walk, the KL gradient between the two denoisers, the fake denoiser's
learning, and its checkpointed state."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import tiny_unet

from punkdiff.pipelines.punkdiff_pipeline import ExactDDIMScheduler
from punkdiff.training.distillation import alpha_sigma, x0_predictor
from punkdiff.training.distribution_matching import FAKE_OPTIMIZER, FAKE_WEIGHTS, DistributionMatchingLoss

SCHEDULE = {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


def setup(seed: int = 0, **options):
    scheduler = DDPMScheduler(num_train_timesteps=1000, **SCHEDULE)
    teacher = tiny_unet(1, 8, seed=seed)
    loss_fn = DistributionMatchingLoss(teacher, dict(scheduler.config), student_steps=4, **options)
    return scheduler, teacher, loss_fn


def test_the_students_walk_is_its_pipelines_four_trailing_ddim_steps():
    """The images the loss judges are the ones users get: trailing DDIM, eta 0, v-prediction, no clipping."""
    scheduler, _, loss_fn = setup()
    student = tiny_unet(1, 8, seed=5).eval()
    noise = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    sampler = ExactDDIMScheduler.from_config(scheduler.config, timestep_spacing="trailing", clip_sample=False)
    sampler.set_timesteps(4)
    with torch.no_grad():
        z = noise.clone()
        for t in sampler.timesteps:
            z = sampler.step(student(z, t).sample, t, z, eta=0.0).prev_sample
        ours = loss_fn.sample(student, noise, scheduler.alphas_cumprod, torch.float32)
    assert z.abs().max() > 0.1
    torch.testing.assert_close(ours, z, atol=1e-5, rtol=1e-5)


def test_while_the_fake_denoiser_is_the_teacher_the_student_gets_no_gradient():
    scheduler, _, loss_fn = setup(warmup=0, fake_updates=0)
    student = tiny_unet(1, 8, seed=5)
    noise = torch.randn(4, 1, 8, 8)
    loss = loss_fn(student, scheduler, noise, noise, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())


def test_the_gradient_on_each_image_is_the_fake_minus_the_teacher_denoised_normalised():
    """d loss / d x = (x0_fake - x0_real) / mean|x - x0_real| / numel: descending it moves x where the teacher's
    denoiser points and away from where the student's own images (the fake's) point."""
    scheduler, teacher, loss_fn = setup(warmup=0, fake_updates=0)
    with torch.no_grad():
        for p in loss_fn.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a fake that has learnt something else
    x = torch.randn(4, 1, 8, 8, requires_grad=True)
    loss_fn.sample = lambda *args: x
    torch.manual_seed(3)
    loss_fn(None, scheduler, x.detach(), x.detach(), torch.zeros(4, dtype=torch.long)).backward()

    torch.manual_seed(3)  # the same draws of t and eps
    t = torch.randint(20, 980, (4,))
    alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
    z_t = alpha * x.detach() + sigma * torch.randn_like(x)
    with torch.no_grad():
        real, _ = x0_predictor(teacher, scheduler.alphas_cumprod, "v_prediction")(z_t, t)
        fake, _ = x0_predictor(loss_fn.fake, scheduler.alphas_cumprod, "v_prediction")(z_t, t)
    weight = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / weight / x.numel()
    assert expected.abs().max() > 0
    torch.testing.assert_close(x.grad, expected)


def test_the_fake_denoiser_learns_the_students_images_and_the_teacher_stays_frozen():
    scheduler, teacher, loss_fn = setup(fake_learning_rate=1e-3)
    before = [p.clone() for p in teacher.parameters()]
    images = torch.full((8, 1, 8, 8), 0.8)  # the student draws flat grey images
    t = torch.full((8,), 500)
    eps = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def fake_error() -> float:
        alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
        fake = x0_predictor(loss_fn.fake, scheduler.alphas_cumprod, "v_prediction")
        with torch.no_grad():
            x0, _ = fake(alpha * images + sigma * eps, t)
        return (x0 - images).pow(2).mean().item()

    start = fake_error()
    for _ in range(30):
        loss_fn.fake_step(images, scheduler.alphas_cumprod)
    assert fake_error() < 0.5 * start
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def test_a_stage_restored_from_its_checkpoint_goes_on_exactly_as_the_uninterrupted_one(tmp_path):
    scheduler, _, first = setup(warmup=2, fake_updates=1)
    student = tiny_unet(1, 8, seed=5)
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    steps = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    first(student, scheduler, noise, noise, steps)
    first.save_state(tmp_path / "fake")
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == sorted([FAKE_WEIGHTS, FAKE_OPTIMIZER])

    _, _, resumed = setup(warmup=2, fake_updates=1)
    resumed.load_state(tmp_path / "fake")
    assert resumed.warmed_up  # no second warm-up
    losses = []
    for loss_fn in (first, resumed):
        torch.manual_seed(1)
        losses.append(loss_fn(student, scheduler, noise, noise, steps))
    assert losses[0].item() != 0.0 and torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(first.fake.parameters(), resumed.fake.parameters(), strict=True))


def test_a_teacher_that_predicts_x0_is_refused():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    with pytest.raises(ValueError, match="needs an epsilon- or v-prediction teacher"):
        DistributionMatchingLoss(tiny_unet(1, 8), dict(scheduler.config), student_steps=4)
