"""Parity: the diffusers sampling path against the from-scratch reference (`punkdiff.reference_sampler`).

Three kinds of test:
- parity, with tolerances: `add_noise` 1e-6, one `step` 1e-5, a full sampling run 1e-4 (max abs, float32);
  the largest difference seen per family is printed in the terminal summary;
- pinned deviations: where diffusers departs from the math, a test states what it does instead and fails if
  upstream changes, so the README's list of deviations stays true;
- PunkDiffPipeline (in memory and exported): it must give the reference result, including where upstream
  schedulers deviate.

Both sides get the schedule in float32 (the pipeline's dtype); the float64 gap is measured separately.
"""

from __future__ import annotations

import functools
import itertools
from fractions import Fraction

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tiny_models import gaussian_denoiser

from punkdiff import parity
from punkdiff import reference_sampler as R
from punkdiff.parity import ADD_NOISE_TOL, SAMPLE_TOL, STEP_TOL

pytestmark = pytest.mark.parity

SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
VARIANCES = ("fixed_small", "fixed_large")
SPACINGS = ("leading", "trailing", "linspace")
# (T, n): odd and prime counts, n = T, T other than 1000. None of these hits a rounding tie (see below).
STEP_GRID = ((1000, 1), (1000, 7), (1000, 50), (999, 999), (50, 7))
SHAPE = (2, 1, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def unet():
    return parity.tiny_unet()


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x, out = torch.randn(2, *SHAPE, generator=g)
    return x, out


def _gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _z(seed: int = 1) -> torch.Tensor:
    """The draw diffusers makes inside `step` from `_gen(seed)`."""
    return R.randn(SHAPE, _gen(seed))


def _pairs(timesteps: list[int]) -> list[tuple[int, int]]:
    """(t, t_prev) for the first two, a middle and the last two steps of a schedule."""
    pairs = list(zip(timesteps, [*timesteps[1:], -1], strict=True))
    keep = sorted({0, 1, len(pairs) // 2, len(pairs) - 2, len(pairs) - 1} & set(range(len(pairs))))
    return [pairs[i] for i in keep]


def _ac(scheduler) -> torch.Tensor:
    return parity.reference_alphas_cumprod(scheduler.config)


# ---- Schedules and add_noise -------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1000, 999, 50, 4000])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_betas(schedule, T, parity_record):
    """Same betas, including the cosine schedule's clip at max_beta = 0.999 (Nichol & Dhariwal: no deviation)."""
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
    ref = R.make_betas(schedule, T)
    rel = ((sched.betas.double() - ref) / ref).abs().max().item()
    parity_record("betas, relative (float32 vs float64)", rel, 1e-6)
    assert rel <= 1e-6
    if schedule == "squaredcos_cap_v2":
        assert sched.betas[-1].item() == pytest.approx(0.999) and ref[-1].item() == 0.999


def test_quadratic_is_diffusers_scaled_linear(parity_record):
    """presets map "quadratic" to diffusers' "scaled_linear": that is the DDPM code's "quad" schedule."""
    ref = R.make_betas("quadratic", 1000)
    rel = ((DDPMScheduler(beta_schedule="scaled_linear").betas.double() - ref) / ref).abs().max().item()
    parity_record("betas, relative (float32 vs float64)", rel, 1e-6)
    assert rel <= 1e-6


@pytest.mark.parametrize("T", [1000, 999, 50, 4000])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise(schedule, T, parity_record):
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
    g = torch.Generator().manual_seed(T)
    x0, noise = torch.randn(2, 16, 3, 8, 8, generator=g)
    t = torch.cat([torch.tensor([0, 1, T - 2, T - 1]), torch.randint(0, T, (12,), generator=g)])
    diff = parity.max_abs_diff(sched.add_noise(x0, noise, t), R.q_sample(x0, t, noise, _ac(sched)))
    parity_record("add_noise", diff, ADD_NOISE_TOL)
    assert diff <= ADD_NOISE_TOL


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_add_noise_float32_schedule_gap(schedule, parity_record):
    """Precision, not math: diffusers keeps alphas_cumprod in float32, so 1 - alpha_bar_t cancels at small t.
    Against a float64 schedule the forward process is off by up to ~2e-5 (T = 4000, cosine)."""
    for T in (1000, 4000):
        sched = DDPMScheduler(num_train_timesteps=T, beta_schedule=schedule)
        x0, noise = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        t = torch.arange(16) * (T // 16)
        ac64 = R.alphas_cumprod(R.make_betas(schedule, T))
        diff = parity.max_abs_diff(sched.add_noise(x0, noise, t), R.q_sample(x0.double(), t, noise.double(), ac64))
        parity_record("add_noise vs float64 schedule (precision only)", diff, 5e-5)
        assert diff <= 5e-5


# ---- Timestep spacing --------------------------------------------------------------------------------------


def _is_tie(T: int, n: int, spacing: str, index: int) -> bool:
    """Whether timestep `index` (in decreasing order) of the exact formula sits on a .5 rounding tie."""
    exact = Fraction(T * (n - index), n) if spacing == "trailing" else Fraction((n - 1 - index) * (T - 1), n - 1)
    return exact.denominator == 2


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
@pytest.mark.parametrize("T", [1000, 999, 50])
def test_leading_timesteps_match(cls, T):
    for offset, n in itertools.product((0, 1), range(1, T)):
        sched = cls(num_train_timesteps=T, steps_offset=offset)
        sched.set_timesteps(n)
        assert sched.timesteps.tolist() == R.spaced_timesteps(T, n, "leading", offset)


@pytest.mark.parametrize("cls", [DDPMScheduler, DDIMScheduler])
def test_leading_offset_full_length_deviation(cls):
    """Deviation: "leading" with steps_offset=1 and n = T schedules t = T, outside the schedule; diffusers
    accepts it and `step` then fails with IndexError. The reference refuses the schedule."""
    sched = cls(steps_offset=1)
    sched.set_timesteps(1000)
    assert sched.timesteps[0].item() == 1000
    x, out = _inputs()
    with pytest.raises(IndexError):
        sched.step(out, sched.timesteps[0], x)
    with pytest.raises(ValueError, match="outside"):
        R.spaced_timesteps(1000, 1000, "leading", steps_offset=1)


@pytest.mark.parametrize("T", [1000, 999, 50])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_trailing_linspace_timesteps_deviations(spacing, T):
    """Deviations, pinned for every n in 1..T. diffusers builds these spacings in floating point:
    1. "trailing" uses np.arange(T, 0, -T/n), which for some n yields n + 1 values, the last being t = -1
       (e.g. T = 1000, n = 61: ..., 32, 15, -1). The extra step evaluates the model at t = -1 and indexes
       alphas_cumprod[-1]: the almost clean sample is treated as if it were at the noisiest level.
    2. Where the exact value is a .5 tie, float error picks the side (e.g. T = 50, n = 12 trailing: 12.5,
       before the -1, becomes 13 where half-to-even gives 12), so a timestep can differ by 1.
    Everything else matches the exact formula. PunkDiffPipeline's schedulers compute them exactly (see
    test_pipeline_schedulers_exact_timesteps)."""
    extra, ties = [], []
    for n in range(1, T + 1):
        sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing)
        sched.set_timesteps(n)
        got, ref = sched.timesteps.tolist(), R.spaced_timesteps(T, n, spacing)
        if len(got) == n + 1:
            assert spacing == "trailing" and got.pop() == -1
            extra.append(n)
        for i, (a, b) in enumerate(zip(got, ref, strict=True)):
            if a != b:
                assert abs(a - b) == 1 and _is_tie(T, n, spacing, i)
                ties.append(n)
    if spacing == "trailing" and T == 1000:
        assert 61 in extra and len(extra) == 62
    if spacing == "trailing" and T == 50:
        assert 12 in ties
    if spacing == "linspace":
        assert not extra


# ---- One step ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("variance_type", VARIANCES)
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddpm_step(schedule, prediction_type, variance_type, spacing, parity_record):
    """DDPMScheduler.step, including strided schedules (it looks the previous timestep up in `timesteps`, so
    custom num_inference_steps are right for every spacing: no deviation)."""
    x, out = _inputs()
    worst = 0.0
    for T, n in STEP_GRID:
        sched = DDPMScheduler(
            num_train_timesteps=T,
            beta_schedule=schedule,
            prediction_type=prediction_type,
            variance_type=variance_type,
            timestep_spacing=spacing,
        )
        sched.set_timesteps(n)
        ac = _ac(sched)
        assert sched.timesteps.tolist() == R.spaced_timesteps(T, n, spacing)
        for t, t_prev in _pairs(sched.timesteps.tolist()):
            if t_prev < 0 and t > 0 and variance_type == "fixed_large":
                continue  # pinned in test_ddpm_last_step_noise_deviation
            got = sched.step(out, t, x, generator=_gen()).prev_sample
            ref = R.ddpm_step(out, x, t, t_prev, ac, _z() if t_prev >= 0 else None, prediction_type, variance_type)
            worst = max(worst, parity.max_abs_diff(got, ref))
    parity_record("DDPM step", worst, STEP_TOL)
    assert worst <= STEP_TOL


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_ddim_step(schedule, prediction_type, eta, parity_record):
    """DDIMScheduler.step where its previous timestep is right: "leading" spacing, and n = T for any spacing."""
    x, out = _inputs()
    worst = 0.0
    for (T, n), spacing in itertools.product(STEP_GRID, SPACINGS):
        if spacing != "leading" and n != T:
            continue  # pinned in test_ddim_prev_timestep_deviation
        sched = DDIMScheduler(
            num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction_type, timestep_spacing=spacing
        )
        sched.set_timesteps(n)
        ac = _ac(sched)
        for t, t_prev in _pairs(sched.timesteps.tolist()):
            got = sched.step(out, t, x, eta=eta, generator=_gen()).prev_sample
            ref = R.ddim_step(out, x, t, t_prev, ac, eta, _z(), prediction_type)
            worst = max(worst, parity.max_abs_diff(got, ref))
    parity_record("DDIM step", worst, STEP_TOL)
    assert worst <= STEP_TOL


@pytest.mark.parametrize("clip", [None, 0.5, 2.0])
def test_clip_sample_range(clip, parity_record):
    """clip_sample / clip_sample_range clamp x0_hat to [-r, r] in both schedulers: no deviation."""
    x, out = _inputs()
    out = 3 * out
    kwargs = {"clip_sample": clip is not None, "clip_sample_range": clip or 1.0}
    ddpm, ddim = DDPMScheduler(**kwargs), DDIMScheduler(**kwargs)
    ddpm.set_timesteps(10)
    ddim.set_timesteps(10)
    ac = _ac(ddpm)
    worst = 0.0
    for t, t_prev in _pairs(ddpm.timesteps.tolist()):
        got = ddpm.step(out, t, x, generator=_gen()).prev_sample
        ref = R.ddpm_step(out, x, t, t_prev, ac, _z() if t_prev >= 0 else None, clip=clip)
        worst = max(worst, parity.max_abs_diff(got, ref))
        got = ddim.step(out, t, x, eta=1.0, generator=_gen()).prev_sample
        worst = max(worst, parity.max_abs_diff(got, R.ddim_step(out, x, t, t_prev, ac, 1.0, _z(), clip=clip)))
    parity_record("DDPM/DDIM step, clip_sample_range", worst, STEP_TOL)
    assert worst <= STEP_TOL


def test_learned_range_and_fixed_small_log(parity_record):
    """No deviation: "learned_range" is Nichol & Dhariwal eq. 15; "fixed_small_log" is fixed_small computed
    through the log (same numbers)."""
    x, out = _inputs()
    v = torch.rand(SHAPE, generator=_gen(3)) * 2 - 1
    ac = _ac(DDPMScheduler())
    worst = 0.0
    for t, t_prev in ((999, 998), (500, 499), (1, 0), (0, -1)):
        sched = DDPMScheduler(variance_type="learned_range")
        got = sched.step(torch.cat([out, v], 1), t, x, generator=_gen()).prev_sample
        z = _z() if t_prev >= 0 else None
        worst = max(
            worst,
            parity.max_abs_diff(
                got, R.ddpm_step(torch.cat([out, v], 1), x, t, t_prev, ac, z, variance_type="learned_range")
            ),
        )
        got = DDPMScheduler(variance_type="fixed_small_log").step(out, t, x, generator=_gen()).prev_sample
        worst = max(worst, parity.max_abs_diff(got, R.ddpm_step(out, x, t, t_prev, ac, z)))
    parity_record("DDPM step, learned_range / fixed_small_log", worst, STEP_TOL)
    assert worst <= STEP_TOL


# ---- Pinned deviations in one step -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spacing", "n", "deviates"),
    [("trailing", 7, True), ("linspace", 7, True), ("linspace", 10, True), ("trailing", 10, False)],
)
def test_ddim_prev_timestep_deviation(spacing, n, deviates, parity_record):
    """Deviation (diffusers #11347, #12633): DDIMScheduler.step steps from t to t - T // n, which is the next
    scheduled timestep only for "leading" spacing (and for "trailing" when n divides T). It is then exactly the
    reference DDIM step to that wrong timestep; for trailing n=7 the last step even lands on alpha_bar_0
    instead of 1. PunkDiffPipeline's DDIM does not have this deviation (see the pipeline tests)."""
    x, out = _inputs()
    sched = DDIMScheduler(timestep_spacing=spacing)
    sched.set_timesteps(n)
    ac = _ac(sched)
    ts = sched.timesteps.tolist()
    gap, emulated = 0.0, 0.0
    for t, t_prev in zip(ts, [*ts[1:], -1], strict=True):
        upstream_prev = max(t - 1000 // n, -1)
        got = sched.step(out, t, x, eta=1.0, generator=_gen()).prev_sample
        emulated = max(emulated, parity.max_abs_diff(got, R.ddim_step(out, x, t, upstream_prev, ac, 1.0, _z())))
        gap = max(gap, parity.max_abs_diff(got, R.ddim_step(out, x, t, t_prev, ac, 1.0, _z())))
    assert emulated <= STEP_TOL
    if deviates:
        parity_record(f"DDIM step, {spacing} spacing (t - T//n)", gap, None)
        assert gap > 1e-2
    else:
        assert gap <= STEP_TOL


@pytest.mark.parametrize("variance_type", VARIANCES)
def test_ddpm_last_step_noise_deviation(variance_type, parity_record):
    """Deviation: DDPMScheduler.step adds noise whenever t > 0, not whenever a step remains, so when the last
    scheduled timestep is above 0 ("trailing", or steps_offset > 0) the final sample gets noise too.
    Ho et al.'s Algorithm 2 sets z = 0 at the last step. With fixed_small the added std is 1e-10 (the variance
    is clamped to 1e-20: harmless); with fixed_large it is sqrt(1 - alpha_bar_t), here 0.44 for t = 142.
    PunkDiffPipeline's DDPM does not have this deviation (test_pipeline_ddpm_trailing_fixed_large)."""
    x, out = _inputs()
    sched = DDPMScheduler(timestep_spacing="trailing", variance_type=variance_type)
    sched.set_timesteps(7)
    ac = _ac(sched)
    t = sched.timesteps[-1].item()
    assert t == 142
    got = sched.step(out, t, x, generator=_gen()).prev_sample
    ref = R.ddpm_step(out, x, t, -1, ac, None, variance_type=variance_type)
    gap = parity.max_abs_diff(got, ref)
    if variance_type == "fixed_small":
        assert gap <= 1e-9
    else:
        parity_record("DDPM last step noise, trailing fixed_large", gap, None)
        assert parity.max_abs_diff(got, ref + (1 - ac[t]).sqrt() * _z()) <= STEP_TOL
        assert gap > 0.1


def test_ddpm_learned_variance_deviation(parity_record):
    """Deviation: for variance_type="learned", DDPMScheduler uses the extra channels as the variance itself
    (noise scale sqrt(v), NaN for v < 0; TypeError without the extra channels), while improved-diffusion
    (Nichol & Dhariwal 2021), where "learned" comes from, reads them as log sigma^2 (scale exp(v / 2))."""
    x, out = _inputs()
    sched = DDPMScheduler(variance_type="learned")
    ac = _ac(sched)
    v = 0.5 + torch.rand(SHAPE, generator=_gen(3))
    got = sched.step(torch.cat([out, v], 1), 500, x, generator=_gen()).prev_sample
    mean, _ = R.posterior_mean_variance(R.predict_x0(out, x, 500, ac), x, 500, 499, ac)
    assert parity.max_abs_diff(got, mean + v.sqrt() * _z()) <= STEP_TOL
    gap = parity.max_abs_diff(got, R.ddpm_step(torch.cat([out, v], 1), x, 500, 499, ac, _z(), variance_type="learned"))
    parity_record("DDPM learned variance (v vs log v)", gap, None)
    assert gap > 0.1
    assert sched.step(torch.cat([out, -v], 1), 500, x, generator=_gen()).prev_sample.isnan().any()
    with pytest.raises(TypeError):
        sched.step(out, 500, x, generator=_gen())


def test_ddpm_fixed_large_log_is_nan():
    """Deviation (diffusers #14569): "fixed_large_log" takes the square root of log(beta) < 0, so every step with
    t > 0 returns NaN. (presets only offer fixed_small and fixed_large.)"""
    x, out = _inputs()
    assert DDPMScheduler(variance_type="fixed_large_log").step(out, 500, x, generator=_gen()).prev_sample.isnan().all()


def test_thresholding_deviation(parity_record):
    """Deviation: with the default sample_max_value=1.0, `thresholding=True` clamps Imagen's s to [1, 1], i.e. it
    is plain clipping to [-1, 1], not dynamic thresholding. With a large sample_max_value it is Imagen's."""
    x, out = _inputs()
    big = 3 * out  # "sample" prediction: x0_hat = big, with |values| well above 1
    default = DDPMScheduler(thresholding=True, prediction_type="sample").step(big, 500, x, generator=_gen())
    assert parity.max_abs_diff(default.pred_original_sample, big.clamp(-1, 1)) <= 1e-6
    gap = parity.max_abs_diff(default.pred_original_sample, R.dynamic_threshold(big))
    parity_record("thresholding with sample_max_value=1", gap, None)
    assert gap > 0.1
    imagen = DDPMScheduler(thresholding=True, sample_max_value=1e6, prediction_type="sample")
    x0 = imagen.step(big, 500, x, generator=_gen()).pred_original_sample
    assert parity.max_abs_diff(x0, R.dynamic_threshold(big)) <= 1e-6


def test_set_alpha_to_one_false_deviation(parity_record):
    """Deviation: DDIMScheduler(set_alpha_to_one=False) ends on alpha_bar_0 instead of alpha_bar = 1, i.e. its
    last step is the reference step to t_prev = 0, one step short of clean data. True (the default, and what
    PunkDiffPipeline uses) is the math."""
    x, out = _inputs()
    sched = DDIMScheduler(set_alpha_to_one=False)
    sched.set_timesteps(10)
    ac = _ac(DDIMScheduler())
    got = sched.step(out, 0, x).prev_sample
    assert parity.max_abs_diff(got, R.ddim_step(out, x, 0, 0, ac)) <= STEP_TOL
    gap = parity.max_abs_diff(got, R.ddim_step(out, x, 0, -1, ac))
    parity_record("DDIM set_alpha_to_one=False, last step", gap, None)
    assert gap > 1e-3


# ---- Full sampling runs ------------------------------------------------------------------------------------

# DDPM runs: every schedule x prediction x variance for 7 steps in each spacing (but trailing + fixed_large,
# the pinned last-step-noise deviation) and for all 999 steps of a T = 999 schedule (fixed_large: linear only).
DDPM_RUNS = [
    (schedule, prediction, variance, T, n, spacing)
    for schedule, prediction, variance in itertools.product(SCHEDULES, PREDICTIONS, VARIANCES)
    for T, n, spacing in [(1000, 7, s) for s in SPACINGS] + [(999, 999, "leading")]
    if not (spacing == "trailing" and variance == "fixed_large")
    and not (n == 999 and variance == "fixed_large" and schedule != "linear")
]


@pytest.mark.parametrize(("schedule", "prediction_type", "variance_type", "T", "n", "spacing"), DDPM_RUNS)
def test_ddpm_sample(schedule, prediction_type, variance_type, T, n, spacing, parity_record):
    """Full DDPM runs with the exact denoiser for Gaussian data as the model (cheap and well-conditioned)."""
    sched = DDPMScheduler(
        num_train_timesteps=T,
        beta_schedule=schedule,
        prediction_type=prediction_type,
        variance_type=variance_type,
        timestep_spacing=spacing,
    )
    ac = _ac(sched)
    model = gaussian_denoiser(ac, prediction_type)
    got = parity.diffusers_sample(model, sched, SHAPE, _gen(0), n)
    timesteps = R.spaced_timesteps(T, n, spacing)
    ref = R.ddpm_sample(model, SHAPE, ac, timesteps, _gen(0), prediction_type, variance_type)
    diff = parity.max_abs_diff(got, ref)
    parity_record(f"DDPM sample, n={n}", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


# DDIM runs: every schedule x prediction x eta for 7 and 50 steps, and all 999 steps of T = 999 (linear).
DDIM_RUNS = [
    (schedule, prediction, eta, T, n)
    for schedule, prediction, eta in itertools.product(SCHEDULES, PREDICTIONS, (0.0, 1.0))
    for T, n in ((1000, 7), (1000, 50), (999, 999))
    if n != 999 or schedule == "linear"
]


@pytest.mark.parametrize(("schedule", "prediction_type", "eta", "T", "n"), DDIM_RUNS)
def test_ddim_sample(schedule, prediction_type, eta, T, n, parity_record):
    """Full DDIM runs ("leading" spacing: the one upstream DDIMScheduler gets right)."""
    sched = DDIMScheduler(num_train_timesteps=T, beta_schedule=schedule, prediction_type=prediction_type)
    ac = _ac(sched)
    model = gaussian_denoiser(ac, prediction_type)
    got = parity.diffusers_sample(model, sched, SHAPE, _gen(0), n, eta)
    timesteps = R.spaced_timesteps(T, n, "leading")
    ref = R.ddim_sample(model, SHAPE, ac, timesteps, _gen(0), eta, prediction_type)
    diff = parity.max_abs_diff(got, ref)
    parity_record(f"DDIM sample, n={n}", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize(
    ("sampler", "config", "n", "eta", "per_image_generators"),
    [
        ("ddpm", {"num_train_timesteps": 999}, 111, 0.0, False),
        ("ddpm", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}, 7, 0.0, True),
        (
            "ddpm",
            {"beta_schedule": "scaled_linear", "variance_type": "fixed_large", "timestep_spacing": "linspace"},
            7,
            0.0,
            False,
        ),
        ("ddim", {}, 50, 0.0, False),
        ("ddim", {}, 50, 1.0, True),
        ("ddim", {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample"}, 7, 1.0, False),
    ],
)
def test_unet_sample(unet, sampler, config, n, eta, per_image_generators, parity_record):
    """Full runs with a real (small, random) UNet2DModel, one generator or one per image."""
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    sched = cls(**config)
    model = parity.unet_model(unet)

    def generator():
        return [_gen(0), _gen(1)] if per_image_generators else _gen(0)

    got = parity.diffusers_sample(model, sched, SHAPE, generator(), n, eta)
    ac, c = _ac(sched), sched.config
    timesteps = R.spaced_timesteps(c.num_train_timesteps, n, c.timestep_spacing)
    if sampler == "ddpm":
        ref = R.ddpm_sample(model, SHAPE, ac, timesteps, generator(), c.prediction_type, c.variance_type)
    else:
        ref = R.ddim_sample(model, SHAPE, ac, timesteps, generator(), eta, c.prediction_type)
    diff = parity.max_abs_diff(got, ref)
    parity_record(f"UNet sample, {sampler}", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


def test_diffusers_loop_is_stock_pipeline(unet):
    """`parity.diffusers_sample` is the loop of diffusers' own DDPMPipeline and DDIMPipeline."""
    from diffusers import DDIMPipeline, DDPMPipeline

    model = parity.unet_model(unet)
    for pipe_cls, sched, kwargs in ((DDPMPipeline, DDPMScheduler(), {}), (DDIMPipeline, DDIMScheduler(), {"eta": 1.0})):
        pipe = pipe_cls(unet=unet, scheduler=sched)
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=2, generator=_gen(0), num_inference_steps=10, output_type="np", **kwargs).images
        ours = parity.diffusers_sample(model, sched, SHAPE, _gen(0), 10, kwargs.get("eta", 0.0))
        assert parity.max_abs_diff(torch.from_numpy(images).permute(0, 3, 1, 2), (ours / 2 + 0.5).clamp(0, 1)) == 0


@pytest.mark.parametrize(("T", "n"), [(1000, 61)])
def test_trailing_extra_step_sample_deviation(T, n, parity_record):
    """Deviation, end to end: with "trailing" and n = 61 diffusers runs 62 steps, the last at t = -1."""
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing="trailing")
    ac = _ac(sched)
    model = gaussian_denoiser(ac)
    got = parity.diffusers_sample(model, sched, SHAPE, _gen(0), n)
    assert len(sched.timesteps) == n + 1
    ref = R.ddim_sample(model, SHAPE, ac, R.spaced_timesteps(T, n, "trailing"), _gen(0))
    gap = parity.max_abs_diff(got, ref)
    parity_record("DDIM sample, trailing n=61 (extra t=-1)", gap, None)
    assert gap > 0.1


# ---- PunkDiffPipeline --------------------------------------------------------------------------------------


def _pipeline(unet, **scheduler_config):
    from punkdiff import PunkDiffPipeline

    pipe = PunkDiffPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _pipeline_vs_reference(pipe, unet, sampler, n, eta, seeds=(0, 1)) -> float:
    """Max |pipeline - reference| on the pipeline's [0, 1] "pt" output, with one generator per image."""
    got = pipe(
        batch_size=len(seeds),
        generator=[_gen(s) for s in seeds],
        num_inference_steps=n,
        eta=eta,
        sampler=sampler,
        output_type="pt",
    ).images
    ref = parity.reference_sample(
        parity.unet_model(unet),
        pipe.scheduler.config,
        sampler,
        (len(seeds), *SHAPE[1:]),
        [_gen(s) for s in seeds],
        n,
        eta,
    )
    return parity.max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1))


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", [7, 10])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_pipeline_ddim_every_spacing(unet, spacing, n, eta, parity_record):
    """PunkDiffPipeline's DDIM is the reference DDIM for every spacing (no t - T // n deviation)."""
    diff = _pipeline_vs_reference(_pipeline(unet, timestep_spacing=spacing), unet, "ddim", n, eta)
    parity_record("PunkDiffPipeline DDIM, every spacing", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize(
    ("config", "n"),
    [
        ({"num_train_timesteps": 200}, None),
        ({"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "variance_type": "fixed_large"}, 7),
    ],
)
def test_pipeline_ddpm(unet, config, n, parity_record):
    pipe = _pipeline(unet, **config)
    steps = n or pipe.scheduler.config.num_train_timesteps  # None: every training step
    got = pipe(batch_size=2, generator=_gen(0), num_inference_steps=n, sampler="ddpm", output_type="pt").images
    ref = parity.reference_sample(parity.unet_model(unet), pipe.scheduler.config, "ddpm", SHAPE, _gen(0), steps)
    diff = parity.max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1))
    parity_record("PunkDiffPipeline DDPM", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize("cls_name", ["ExactDDPMScheduler", "ExactDDIMScheduler"])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_pipeline_schedulers_exact_timesteps(cls_name, spacing):
    """PunkDiffPipeline's DDPM and DDIM schedulers visit exactly the reference timesteps for every n in 1..T: no
    extra t = -1 step and no off-by-one at .5 ties (test_trailing_linspace_timesteps_deviations pins upstream)."""
    from punkdiff.pipelines import punkdiff_pipeline

    for T in (1000, 999, 50):
        sched = getattr(punkdiff_pipeline, cls_name)(num_train_timesteps=T, timestep_spacing=spacing)
        for n in range(1, T + 1):
            sched.set_timesteps(n)
            assert sched.timesteps.tolist() == R.spaced_timesteps(T, n, spacing), (T, n)
    if spacing == "leading":
        with pytest.raises(ValueError, match="outside"):
            getattr(punkdiff_pipeline, cls_name)(steps_offset=1).set_timesteps(1000)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
@pytest.mark.parametrize(
    ("T", "n", "spacing"),
    [(1000, 61, "trailing"), (50, 12, "trailing"), (1000, 27, "linspace")],
    ids=["trailing-extra-step", "trailing-tie", "linspace-tie"],
)
def test_pipeline_extra_step_and_ties(unet, sampler, T, n, spacing, parity_record):
    """Where upstream set_timesteps adds a t = -1 step (trailing, T = 1000, n = 61) or rounds a .5 tie the other
    way (T = 50, n = 12 trailing; T = 1000, n = 27 linspace), PunkDiffPipeline still gives the reference result."""
    pipe = _pipeline(unet, num_train_timesteps=T, timestep_spacing=spacing)
    diff = _pipeline_vs_reference(pipe, unet, sampler, n, 0.0)
    parity_record("PunkDiffPipeline, upstream's extra t=-1 / tie cases", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize(
    "config", [{"timestep_spacing": "trailing"}, {"steps_offset": 1}], ids=["trailing", "steps_offset"]
)
def test_pipeline_ddpm_trailing_fixed_large(unet, config, parity_record):
    """No noise on the last DDPM step although its timestep is > 0 (test_ddpm_last_step_noise_deviation pins
    upstream's noise there), so fixed_large gives the reference result."""
    pipe = _pipeline(unet, variance_type="fixed_large", **config)
    diff = _pipeline_vs_reference(pipe, unet, "ddpm", 7, 0.0)
    parity_record("PunkDiffPipeline DDPM, last step t > 0", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("n", parity.FEW_STEPS)
@pytest.mark.parametrize(
    "config",
    [{}, {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}],
    ids=["linear-epsilon", "cosine-v"],
)
def test_pipeline_few_step_ddim_trailing(unet, config, n, eta, parity_record):
    """"ddim-trailing" at 1, 2, 4 and 8 steps (a distilled student's sampler) is the reference DDIM with trailing
    spacing, t_k = round(T k / n) - 1, whatever spacing the saved config names."""
    pipe = _pipeline(unet, **config)
    assert pipe.scheduler.config.timestep_spacing == "leading"
    got = parity.few_step_trailing(pipe, n, eta)
    trailing = {**pipe.scheduler.config, "timestep_spacing": "trailing"}
    assert R.spaced_timesteps(1000, n, "trailing")[0] == 999
    ref = parity.reference_sample(parity.unet_model(unet), trailing, "ddim", SHAPE, _gen(0), n, eta)
    diff = parity.max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1))
    parity_record("PunkDiffPipeline ddim-trailing, 1-8 steps", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize("n", parity.FEW_STEPS)
def test_stock_ddim_pipeline_trailing_gives_the_same_images(unet, n, parity_record):
    """A user without punkdiff: stock `DDIMPipeline` with `DDIMScheduler.from_config(config,
    timestep_spacing="trailing")`, eta 0, the same generator, gives PunkDiffPipeline's "ddim-trailing" images (n
    divides T, so upstream's t - T // n is the next trailing timestep)."""
    pipe = _pipeline(unet, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ours, stock = parity.few_step_trailing(pipe, n), parity.stock_trailing(pipe, n)
    diff = parity.max_abs_diff(ours, stock)
    parity_record("stock DDIMPipeline trailing vs PunkDiffPipeline, 1-8 steps", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL
    if n > 1:  # the comparison can fail: another step count gives other images
        assert parity.max_abs_diff(ours, parity.stock_trailing(pipe, n // 2)) > 1e-3


def test_exported_pipeline_reproduced(unet, tmp_path, parity_record):
    """An exported, reloaded PunkDiffPipeline gives the reference result from the same seed."""
    from punkdiff import hub

    folder = hub.export_pipeline(
        unet, DDPMScheduler(num_train_timesteps=100, timestep_spacing="trailing"), tmp_path / "m"
    )
    pipe = hub.load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    for sampler, n, eta in (("ddpm", None, 0.0), ("ddim", 7, 0.0), ("ddim", 7, 1.0)):
        got = pipe(batch_size=2, generator=_gen(0), num_inference_steps=n, eta=eta, sampler=sampler, output_type="pt")
        ref = parity.reference_sample(
            parity.unet_model(pipe.unet), pipe.scheduler.config, sampler, SHAPE, _gen(0), n or 100, eta
        )
        diff = parity.max_abs_diff(got.images, (ref / 2 + 0.5).clamp(0, 1))
        parity_record("exported PunkDiffPipeline", diff, SAMPLE_TOL)
        assert diff <= SAMPLE_TOL


# ---- classifier-free guidance --------------------------------------------------------------------------------


@functools.cache
def _conditional_pipeline(kind: str, prediction_type: str):
    """A tiny random conditional PunkDiffPipeline: digits through the UNet's class embedding (`num_class_embeds`,
    `class_embed_type` None), or type + accessories through the attribute encoder (`class_embed_type="identity"`)."""
    from punkdiff.pipelines.punkdiff_pipeline import AttributeEncoder, ConditionVocabulary, PunkDiffPipeline

    scheduler = DDPMScheduler(prediction_type=prediction_type, beta_schedule="squaredcos_cap_v2")
    if kind == "labels":
        condition = ConditionVocabulary.from_dict({
            "format": "punkdiff-condition", "version": 1,
            "groups": [{"column": "label", "kind": "single", "names": list("0123456789")}]})
        pipe = PunkDiffPipeline(parity.tiny_unet(num_class_embeds=11), scheduler, condition=condition)
    else:
        condition = ConditionVocabulary.from_dict({
            "format": "punkdiff-condition", "version": 1,
            "groups": [{"column": "type", "kind": "single", "names": ["Alien", "Ape", "Male"]},
                       {"column": "accessories", "kind": "multi", "names": ["Cap", "Pipe", "Hoodie"]}]})
        torch.manual_seed(1)
        encoder = AttributeEncoder(condition.width, 4 * 8)  # tiny_unet's time embedding is 4 x 8 wide
        pipe = PunkDiffPipeline(parity.tiny_unet(class_embed_type="identity"), scheduler, encoder, condition)
    pipe.set_progress_bar_config(disable=True)
    return pipe


GUIDED_REQUESTS = {
    "labels": {"labels": [3, 7]},
    "attributes": {"attributes": [{"type": "Ape", "accessories": ["Cap", "Hoodie"]}, {"accessories": []}]},
}


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", 0.0)])
@pytest.mark.parametrize("guidance_scale", [0.0, 1.0, 3.0])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("kind", ["labels", "attributes"])
def test_pipeline_guided_sample(kind, prediction_type, guidance_scale, sampler, eta, parity_record):
    """PunkDiffPipeline's guided step (one doubled forward, then DDIM/DDPM) is the reference's: two separate calls,
    (1 + w) eps(z, c) - w eps(z) with w = guidance_scale - 1, then the reference step; per-image generators."""
    pipe = _conditional_pipeline(kind, prediction_type)
    diff = parity.guided_pipeline_vs_reference(pipe, GUIDED_REQUESTS[kind], guidance_scale, sampler, 7, eta)
    parity_record("PunkDiffPipeline guided sampling", diff, SAMPLE_TOL)
    assert diff <= SAMPLE_TOL


@pytest.mark.parametrize("kind", ["labels", "attributes"])
def test_guided_parity_sees_the_guidance_and_the_condition(kind):
    """The comparison above can fail: the reference at another scale, or with another condition, is far off."""
    pipe = _conditional_pipeline(kind, "epsilon")
    request = GUIDED_REQUESTS[kind]
    condition = pipe.condition.encode_request(**request)
    model = parity.conditional_unet_model(pipe.unet, pipe.attribute_encoder)
    got = pipe(**request, guidance_scale=3.0, generator=[_gen(0), _gen(1)], num_inference_steps=7, sampler="ddim",
               output_type="pt").images
    null = pipe.condition.null(2)
    for wrong_condition, wrong_scale in ((condition, 1.0), (null, 3.0)):
        ref = parity.reference_sample(R.guided_model(model, wrong_condition, null, wrong_scale), pipe.scheduler.config,
                                      "ddim", SHAPE, [_gen(0), _gen(1)], 7)
        assert parity.max_abs_diff(got, (ref / 2 + 0.5).clamp(0, 1)) > 100 * SAMPLE_TOL


def test_reference_guidance_is_the_papers_combination():
    cond, uncond = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 1.0])
    assert torch.equal(R.guided_output(cond, uncond, 1.0), cond)
    assert torch.equal(R.guided_output(cond, uncond, 0.0), uncond)
    assert torch.equal(R.guided_output(cond, uncond, 3.0), torch.tensor([4.0, -5.0]))  # w = 2: 3 cond - 2 uncond
    calls = []
    model = R.guided_model(lambda x, t, c: calls.append(c) or x * c, torch.tensor(2.0), torch.tensor(1.0), 3.0)
    assert model(torch.tensor(1.0), 5) == 4.0 and calls == [2.0, 1.0]


def test_punkdiff_parity_command(monkeypatch, capsys):
    """`punkdiff parity` prints the sweep and exits 0 on this install (T = 100 here, to stay fast)."""
    from punkdiff import cli

    monkeypatch.setattr(parity, "run_parity", functools.partial(parity.run_parity, num_train_timesteps=100))
    assert cli.main(["parity"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "PunkDiffPipeline DDIM 7 steps linspace" in out and "FAIL" not in out
    assert "stock DDIMPipeline trailing 4 steps" in out and "PunkDiffPipeline ddim-trailing 1 steps" in out


def test_punkdiff_parity_command_fails_on_mismatch(monkeypatch, capsys):
    from punkdiff import cli

    monkeypatch.setattr(parity, "run_parity", lambda: [parity.ParityRow("broken", 1.0, SAMPLE_TOL)])
    assert cli.main(["parity"]) == 1
    assert "FAIL" in capsys.readouterr().out
