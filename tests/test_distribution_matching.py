"""Distribution matching (DMD): the student's walk, the KL gradient between the two denoisers, the fake denoiser's
learning, the GAN's discriminator and gradient, and their checkpointed state."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler
from tiny_models import tiny_unet

from punkdiff.pipelines.punkdiff_pipeline import ExactDDIMScheduler
from punkdiff.training.distillation import alpha_sigma, x0_predictor
from punkdiff.training.distribution_matching import (
    FAKE_OPTIMIZER,
    FAKE_WEIGHTS,
    GAN_T_LOW,
    DistributionMatchingLoss,
)

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
    scheduler, _, loss_fn = setup(warmup=0, fake_updates=0, gan_weight=0.0)
    student = tiny_unet(1, 8, seed=5)
    noise = torch.randn(4, 1, 8, 8)
    loss = loss_fn(student, scheduler, noise, noise, torch.zeros(4, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or p.grad.abs().max() == 0 for p in student.parameters())


@pytest.mark.parametrize("gan_weight", [0.0, 3.0])
def test_the_gradient_on_each_image_is_the_fake_minus_the_teacher_denoised_normalised(gan_weight):
    """d loss / d x = (x0_fake - x0_real) / mean|x - x0_real| / numel: descending it moves x where the teacher's
    denoiser points and away from where the student's own images (the fake's) point. With the GAN on, only images
    noised below GAN_T_LOW T get it: above, the discriminator alone judges them."""
    scheduler, teacher, loss_fn = setup(warmup=0, fake_updates=0, gan_weight=gan_weight)
    with torch.no_grad():
        for p in loss_fn.fake.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a fake that has learnt something else
        if loss_fn.discriminator is not None:
            torch.nn.init.zeros_(loss_fn.discriminator.net[-1].weight)  # one that cannot tell: no GAN gradient
    x = torch.randn(8, 1, 8, 8, requires_grad=True)
    loss_fn.sample = lambda *args: x
    torch.manual_seed(3)
    loss_fn(None, scheduler, x.detach(), x.detach(), torch.zeros(8, dtype=torch.long)).backward()

    torch.manual_seed(3)  # the same draws of t and eps
    t = torch.randint(20, 980, (8,))
    matched = torch.ones(8) if gan_weight == 0 else (t < round(GAN_T_LOW * 1000)).float()
    assert 0 < matched.sum() < 8 or gan_weight == 0  # the draw has images on both sides
    alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, t)
    z_t = alpha * x.detach() + sigma * torch.randn_like(x)
    with torch.no_grad():
        real, _ = x0_predictor(teacher, scheduler.alphas_cumprod, "v_prediction")(z_t, t)
        fake, _ = x0_predictor(loss_fn.fake, scheduler.alphas_cumprod, "v_prediction")(z_t, t)
    weight = (x.detach() - real).abs().mean(dim=(1, 2, 3), keepdim=True)
    expected = (fake - real) / weight / x.numel() * matched.view(-1, 1, 1, 1)
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
    real = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1
    steps = torch.zeros(4, dtype=torch.long)
    torch.manual_seed(0)
    for _ in range(2):  # the discriminator's 2 warm-up updates: the next call has the GAN term
        first(student, scheduler, real, noise, steps)
    first.save_state(tmp_path / "fake")
    assert sorted(p.name for p in (tmp_path / "fake").iterdir()) == sorted([FAKE_WEIGHTS, FAKE_OPTIMIZER])

    _, _, resumed = setup(warmup=2, fake_updates=1)
    resumed.load_state(tmp_path / "fake")
    assert resumed.warmed_up and resumed.discriminator_updates == 2  # no second warm-up of either
    losses, gradients = [], []
    for loss_fn in (first, resumed):
        student.zero_grad()
        torch.manual_seed(1)
        losses.append(loss_fn(student, scheduler, real, noise, steps))
        losses[-1].backward()
        gradients.append([p.grad.clone() for p in student.parameters()])
    assert losses[0].item() != 0.0 and torch.equal(losses[0], losses[1])
    assert all(torch.equal(a, b) for a, b in zip(*gradients, strict=True))
    for a, b in ((first.fake, resumed.fake), (first.discriminator, resumed.discriminator)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert first.discriminator_updates == resumed.discriminator_updates == 3


def discriminated(loss_fn, scheduler, images: torch.Tensor, t: int = 300) -> torch.Tensor:
    """The discriminator's mean logit for `images` noised to t (positive: it finds them real)."""
    alpha, sigma = alpha_sigma(scheduler.alphas_cumprod, torch.full((images.shape[0],), t))
    with torch.no_grad():
        loss_fn.teacher(alpha * images + sigma * torch.randn_like(images), torch.full((images.shape[0],), t))
        return loss_fn.discriminator(loss_fn._features).mean()


def test_the_discriminator_learns_to_tell_real_images_from_the_students_through_the_frozen_teacher():
    scheduler, teacher, loss_fn = setup()
    before = [p.clone() for p in teacher.parameters()]
    real, drawn = torch.full((8, 1, 8, 8), 0.8), torch.full((8, 1, 8, 8), -0.8)  # the student draws the wrong grey
    torch.manual_seed(0)
    start = discriminated(loss_fn, scheduler, real) - discriminated(loss_fn, scheduler, drawn)
    for _ in range(40):
        loss_fn.discriminator_step(drawn, real, scheduler.alphas_cumprod)
    learnt = discriminated(loss_fn, scheduler, real) - discriminated(loss_fn, scheduler, drawn)
    assert learnt > 1.0 and learnt > start + 1.0
    assert loss_fn.discriminator_updates == 40
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters(), strict=True))


def gan_step(gan_weight: float) -> torch.Tensor:
    """Where descending the student's gradient moves its grey images (-0.8) after the discriminator has learnt
    that real images are 0.8, with the fake still the teacher (no DMD gradient)."""
    scheduler, _, loss_fn = setup(warmup=0, fake_updates=0, gan_weight=gan_weight)
    real, drawn = torch.full((8, 1, 8, 8), 0.8), torch.full((8, 1, 8, 8), -0.8)
    torch.manual_seed(0)
    for _ in range(40 if gan_weight else 0):
        loss_fn.discriminator_step(drawn, real, scheduler.alphas_cumprod)
    x = drawn.clone().requires_grad_(True)
    loss_fn.sample = lambda *args: x
    torch.manual_seed(1)
    loss = loss_fn(None, scheduler, real, drawn, torch.zeros(8, dtype=torch.long))
    assert loss.item() == 0.0  # the GAN adds to the gradient, not to the reported loss
    loss.backward()
    return -x.grad


def test_the_gan_term_moves_the_students_images_toward_what_the_discriminator_finds_real_by_its_weight():
    half, full = gan_step(0.5), gan_step(1.0)
    assert full.mean() > 0  # toward 0.8, what is real
    torch.testing.assert_close(full, 2 * half)
    assert torch.equal(gan_step(0.0), torch.zeros_like(full))  # no GAN: no discriminator, no gradient


def test_a_teacher_that_predicts_x0_is_refused():
    scheduler = DDPMScheduler(num_train_timesteps=1000, prediction_type="sample")
    with pytest.raises(ValueError, match="needs an epsilon- or v-prediction teacher"):
        DistributionMatchingLoss(tiny_unet(1, 8), dict(scheduler.config), student_steps=4)
