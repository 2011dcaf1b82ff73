"""The reference math on its own: closed forms, identities between the papers' equations, and properties.

Nothing here imports diffusers: these tests check `punkdiff.reference_sampler` against the papers, so that the parity
suite (tests/test_parity.py) compares diffusers with something known to be right.
"""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from punkdiff import reference_sampler as R

SCHEDULES = ("linear", "scaled_linear", "quadratic", "squaredcos_cap_v2")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
SPACINGS = ("leading", "trailing", "linspace")

schedules = st.sampled_from(SCHEDULES)
train_steps = st.integers(min_value=2, max_value=2000)
beta_ranges = st.tuples(
    st.floats(min_value=1e-5, max_value=1e-3), st.floats(min_value=2e-3, max_value=0.05)
)  # (beta_start, beta_end) around the DDPM defaults


def _schedule(name: str, T: int, betas: tuple[float, float] = (1e-4, 0.02)) -> torch.Tensor:
    return R.alphas_cumprod(R.make_betas(name, T, *betas))


@st.composite
def schedule_and_step(draw: st.DrawFn) -> tuple[torch.Tensor, int, int]:
    """A float64 schedule and a pair t > t_prev (t_prev = -1 is the last step)."""
    T = draw(train_steps)
    ac = _schedule(draw(schedules), T, draw(beta_ranges))
    t = draw(st.integers(0, T - 1))
    return ac, t, draw(st.integers(-1, t - 1))


def test_reference_imports_torch_only():
    """The oracle must not share code with what it checks."""
    tree = ast.parse(Path(R.__file__).read_text())
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {
        node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module
    }
    assert imported <= {"__future__", "math", "collections", "fractions", "typing", "torch"}


# ---- Schedules ---------------------------------------------------------------------------------------------


def test_linear_schedule_is_ho_et_al():
    betas = R.make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1].item() == pytest.approx(0.02, abs=1e-15)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


@pytest.mark.parametrize("T", [2, 7, 999, 1000])
def test_quadratic_is_scaled_linear(T):
    """The DDPM code's "quad" schedule is what diffusers calls "scaled_linear"."""
    quad, scaled = R.make_betas("quadratic", T), R.make_betas("scaled_linear", T)
    assert torch.allclose(quad, scaled, rtol=0, atol=1e-15)
    assert torch.allclose(quad.sqrt().diff(), quad.sqrt().diff()[:1].expand(T - 1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [50, 999, 1000, 4000])
def test_cosine_schedule_is_nichol_dhariwal(T):
    """alpha_bar_t = f(t)/f(0) (eq. 17) wherever beta is not clipped; beta is clipped at 0.999 at the end."""
    betas = R.make_betas("squaredcos_cap_v2", T)
    ac = R.alphas_cumprod(betas)

    def f(u: float) -> float:
        return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

    closed = torch.tensor([f((i + 1) / T) / f(0) for i in range(T)], dtype=torch.float64)
    clipped = betas == 0.999
    assert clipped.nonzero().flatten().tolist() == [T - 1]
    assert torch.allclose(ac[:-1], closed[:-1], rtol=1e-10, atol=0)


@settings(max_examples=60, deadline=None)
@given(schedules, train_steps, beta_ranges)
def test_alphas_cumprod_strictly_decreasing_in_unit_interval(name, T, betas):
    ac = _schedule(name, T, betas)
    assert (ac > 0).all() and (ac < 1).all()
    assert (ac.diff() < 0).all()


# ---- Timestep spacing -------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(train_steps, st.data())
def test_spaced_timesteps_are_a_decreasing_subset(T, data):
    n = data.draw(st.integers(1, T))
    for spacing in SPACINGS:
        ts = R.spaced_timesteps(T, n, spacing)
        assert len(ts) == n
        assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
        assert ts[-1] >= 0 and ts[0] <= T - 1
    assert R.spaced_timesteps(T, n, "trailing")[0] == T - 1
    assert R.spaced_timesteps(T, n, "leading") == list(range(0, n * (T // n), T // n))[::-1]
    if n > 1:
        assert R.spaced_timesteps(T, n, "linspace")[:: n - 1] == [T - 1, 0]


def test_spaced_timesteps_examples():
    """Lin et al. 2024, Table 2 (T = 1000, n = 10), and a count that does not divide T."""
    assert R.spaced_timesteps(1000, 10, "leading") == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    assert R.spaced_timesteps(1000, 10, "trailing") == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert R.spaced_timesteps(1000, 10, "linspace") == [999, 888, 777, 666, 555, 444, 333, 222, 111, 0]
    assert R.spaced_timesteps(1000, 7, "trailing") == [999, 856, 713, 570, 428, 285, 142]
    assert R.spaced_timesteps(1000, 10, "leading", steps_offset=1)[-1] == 1
    with pytest.raises(ValueError, match="outside"):
        R.spaced_timesteps(1000, 1000, "leading", steps_offset=1)


# ---- Forward process and parameterisations ----------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(schedules, train_steps, beta_ranges, st.integers(0, 2**31 - 1))
def test_q_sample_at_t0_is_x0_up_to_first_beta(name, T, betas, seed):
    """x_1 = sqrt(1 - b_1) x_0 + sqrt(b_1) eps, so |x_1 - x_0| <= b_1 |x_0| + sqrt(b_1) |eps|."""
    ac = _schedule(name, T, betas)
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 3, 1, 4, 4, generator=g, dtype=torch.float64)
    b1 = 1 - ac[0]
    bound = b1 * x0.abs() + b1.sqrt() * noise.abs()
    assert ((R.q_sample(x0, 0, noise, ac) - x0).abs() <= bound + 1e-12).all()


def test_q_sample_per_sample_timesteps():
    ac = _schedule("linear", 1000)
    x0, noise = torch.randn(2, 3, 1, 4, 4, dtype=torch.float64)
    t = torch.tensor([0, 500, 999])
    each = torch.cat([R.q_sample(x0[i : i + 1], int(t[i]), noise[i : i + 1], ac) for i in range(3)])
    assert torch.equal(R.q_sample(x0, t, noise, ac), each)


@settings(max_examples=100, deadline=None)
@given(schedule_and_step(), st.integers(0, 2**31 - 1))
def test_perfect_predictor_recovers_x0(case, seed):
    """With the true noise (or true v, or x_0 itself) the implied x_0 is the real one, and so is the noise."""
    ac, t, _ = case
    g = torch.Generator().manual_seed(seed)
    x0, noise = torch.randn(2, 2, 1, 4, 4, generator=g, dtype=torch.float64)
    ab = ac[t]
    x_t = R.q_sample(x0, t, noise, ac)
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0  # Salimans & Ho 2022, sec. 4
    tol = 1e-9 / ab.sqrt().item()  # 1/sqrt(ab) amplifies rounding at the noisiest steps
    for prediction_type, target in (("epsilon", noise), ("sample", x0), ("v_prediction", v)):
        assert torch.allclose(R.predict_x0(target, x_t, t, ac, prediction_type, clip=None), x0, rtol=0, atol=tol)
        assert torch.allclose(R.predict_epsilon(target, x_t, t, ac, prediction_type), noise, rtol=0, atol=tol)


@settings(max_examples=30, deadline=None)
@given(schedules, st.integers(10, 1000), st.sampled_from(SPACINGS), st.data())
def test_ddim_with_perfect_predictor_lands_on_x0(name, T, spacing, data):
    """With the noise that generated x_t, every DDIM (eta = 0) step stays on the line from x_0 to x_t and the
    last one lands on x_0 (Song et al. 2021, eq. 12 with eps = eps_true)."""
    ac = _schedule(name, T)
    x0, noise = torch.randn(2, 2, 1, 4, 4, dtype=torch.float64)
    timesteps = R.spaced_timesteps(T, data.draw(st.integers(1, min(T, 50))), spacing)
    x = R.q_sample(x0, timesteps[0], noise, ac)
    for t, t_prev in zip(timesteps, [*timesteps[1:], -1], strict=True):
        x = R.ddim_step(noise, x, t, t_prev, ac, eta=0.0, clip=None)
        if t_prev >= 0:
            assert torch.allclose(x, R.q_sample(x0, t_prev, noise, ac), atol=1e-9)
    assert torch.allclose(x, x0, atol=1e-9)


def test_clip_clamps_x0():
    ac = _schedule("linear", 1000)
    x0 = R.predict_x0(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 5.0), 10, ac, clip=1.0)
    assert torch.equal(x0, torch.ones(1, 1, 2, 2))
    x0 = R.predict_x0(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 5.0), 10, ac, clip=2.0)
    assert torch.equal(x0, torch.full((1, 1, 2, 2), 2.0))


def test_dynamic_threshold():
    """s = max(1, quantile); values are clipped to [-s, s] and divided by s (Saharia et al. 2022)."""
    x = torch.linspace(-4, 4, 201).reshape(1, 1, 201, 1)
    out = R.dynamic_threshold(x, ratio=0.5)
    s = torch.quantile(x.abs().flatten(), 0.5)
    assert s > 1 and torch.allclose(out, x.clamp(-s, s) / s)
    small = 0.5 * torch.rand(1, 1, 4, 4)
    assert torch.equal(R.dynamic_threshold(small), small)  # s clamps to 1: nothing to do inside [-1, 1]
    assert torch.allclose(R.dynamic_threshold(x, ratio=0.995, max_value=1.0), x.clamp(-1, 1))


# ---- Posterior, variances, steps --------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(schedule_and_step())
def test_variances_non_negative(case):
    ac, t, t_prev = case
    assert R.posterior_variance(t, t_prev, ac) >= 0
    assert R.step_beta(t, t_prev, ac) >= 0
    for variance_type in ("fixed_small", "fixed_large"):
        assert R.ddpm_variance(t, t_prev, ac, variance_type) >= 0
    for eta in (0.0, 0.5, 1.0):
        sigma = R.ddim_sigma(t, t_prev, ac, eta)
        assert sigma >= 0 and 1 - R.alpha_bar(ac, t_prev) - sigma**2 >= -1e-15
    assert R.posterior_variance(t, t_prev, ac) <= R.step_beta(t, t_prev, ac)  # beta_tilde <= beta


@settings(max_examples=100, deadline=None)
@given(schedule_and_step())
def test_ddim_eta1_variance_is_ddpm_posterior(case):
    """Song et al. 2021, eq. 16: with eta = 1, sigma^2 is the DDPM posterior variance beta_tilde."""
    ac, t, t_prev = case
    assert R.ddim_sigma(t, t_prev, ac, 1.0) ** 2 == pytest.approx(R.posterior_variance(t, t_prev, ac).item(), abs=1e-15)


@pytest.mark.parametrize("name", ["linear", "squaredcos_cap_v2"])
def test_ddpm_mean_matches_epsilon_form(name):
    """The x_0 form of the posterior mean (eqs. 7 + 15) equals Ho et al.'s eq. 11:
    mu = (x_t - beta_t / sqrt(1 - ab_t) eps) / sqrt(alpha_t)."""
    ac = _schedule(name, 1000)
    x_t, eps = torch.randn(2, 2, 1, 4, 4, dtype=torch.float64)
    for t in (1, 10, 500, 998):
        alpha = ac[t] / ac[t - 1]
        eq11 = (x_t - (1 - alpha) / (1 - ac[t]).sqrt() * eps) / alpha.sqrt()
        got = R.ddpm_step(eps, x_t, t, t - 1, ac, torch.zeros_like(x_t), clip=None)
        assert torch.allclose(got, eq11, atol=1e-10)


def test_ddim_eta1_step_is_ddpm_step():
    """Without clipping, eta = 1 DDIM is the DDPM ancestral step with fixed_small (Song et al. 2021, sec. 4.1)."""
    ac = _schedule("linear", 1000)
    x_t, eps, z = torch.randn(3, 2, 1, 4, 4, dtype=torch.float64)
    for t, t_prev in ((999, 899), (500, 499), (10, -1)):
        ddpm = R.ddpm_step(eps, x_t, t, t_prev, ac, z, clip=None)
        ddim = R.ddim_step(eps, x_t, t, t_prev, ac, eta=1.0, noise=z, clip=None)
        assert torch.allclose(ddpm, ddim, atol=1e-10)


def test_last_ddpm_step_returns_clipped_x0():
    """At t_prev = -1 the posterior mean is x0_hat and no noise is added (Algorithm 2, z = 0 at t = 1)."""
    ac = _schedule("linear", 1000)
    x_t, out = torch.randn(2, 2, 1, 4, 4)
    for variance_type in ("fixed_small", "fixed_large"):
        got = R.ddpm_step(out, x_t, 0, -1, ac, None, variance_type=variance_type)
        assert torch.allclose(got, R.predict_x0(out, x_t, 0, ac), atol=1e-6)


def test_learned_variances():
    """ "learned" outputs log sigma^2; "learned_range" interpolates log beta_tilde (v=-1) .. log beta (v=1)."""
    ac = _schedule("linear", 1000)
    t, t_prev = 500, 400
    v = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    assert torch.allclose(R.ddpm_variance(t, t_prev, ac, "learned", v), v.exp())
    got = R.ddpm_variance(t, t_prev, ac, "learned_range", v)
    lo, hi = R.posterior_variance(t, t_prev, ac), R.step_beta(t, t_prev, ac)
    assert torch.allclose(got, torch.stack([lo, (lo * hi).sqrt(), hi]))


# ---- Samplers ---------------------------------------------------------------------------------------------


def _toy_model(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.tanh(x) * (1 + t / 1000)


@settings(max_examples=20, deadline=None)
@given(
    schedules, st.sampled_from(SPACINGS), st.sampled_from(PREDICTIONS), st.integers(1, 20), st.integers(0, 2**31 - 1)
)
def test_ddim_eta0_is_deterministic(name, spacing, prediction_type, n, seed):
    """eta = 0 draws nothing after x_T: the result is a function of x_T alone."""
    ac = _schedule(name, 100)
    ts = R.spaced_timesteps(100, n, spacing)
    g = torch.Generator().manual_seed(seed)
    first = R.ddim_sample(_toy_model, (2, 1, 4, 4), ac, ts, g, eta=0.0, prediction_type=prediction_type)
    after = torch.randn(1, generator=g)
    g2 = torch.Generator().manual_seed(seed)
    assert torch.equal(
        first, R.ddim_sample(_toy_model, (2, 1, 4, 4), ac, ts, g2, eta=0.0, prediction_type=prediction_type)
    )
    g3 = torch.Generator().manual_seed(seed)
    torch.randn((2, 1, 4, 4), generator=g3)
    assert torch.equal(after, torch.randn(1, generator=g3))  # only x_T was drawn


def test_ddpm_draws_one_noise_per_step_but_the_last():
    ac = _schedule("linear", 100)
    g = torch.Generator().manual_seed(0)
    R.ddpm_sample(_toy_model, (2, 1, 4, 4), ac, [99, 50, 0], g)
    g2 = torch.Generator().manual_seed(0)
    for _ in range(3):  # x_T, then z after steps 99 and 50
        torch.randn((2, 1, 4, 4), generator=g2)
    assert torch.equal(torch.randn(1, generator=g), torch.randn(1, generator=g2))


def test_generator_list_is_per_image():
    """With a list of generators, image i depends on generator i only, whatever the batch."""
    ac = _schedule("linear", 100)
    ts = R.spaced_timesteps(100, 10, "leading")
    batch = R.ddpm_sample(_toy_model, (3, 1, 4, 4), ac, ts, [torch.Generator().manual_seed(s) for s in (0, 1, 2)])
    alone = R.ddpm_sample(_toy_model, (1, 1, 4, 4), ac, ts, [torch.Generator().manual_seed(1)])
    assert torch.allclose(batch[1:2], alone, atol=1e-6)
