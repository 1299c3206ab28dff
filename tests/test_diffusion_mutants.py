"""Tests that catch wrong diffusion math (issue 21 item 5): each pins a formula to float64 precision.

Hand-made mutants that the closed-form mixture tests let through, and the test here that kills each (docs/diffusion.md,
"Mutation testing"):

* DDIM's sigma without its first factor sqrt((1 - abar') / (1 - abar)), or squared: ``test_ddim_at_eta_1_is_the_
  ancestral_fixed_small_sampler_step_for_step`` and ``test_ddim_draws_the_noise_of_eq_16``.
* ancestral sampling with sqrt(beta) noise under the fixed-small variance: the same DDIM = ancestral test and
  ``test_ancestral_noise_is_the_square_root_of_its_variance``.
* ``condition_mean`` shifting by beta instead of Sigma: ``test_condition_mean_moves_the_mean_by_exactly_sigma_g``.
* the discretised likelihood through an approximate CDF (improved-diffusion's tanh, good to ~1e-4): the likelihood
  tests at the exact CDF's precision, 1e-10 instead of 1e-3.

The data are Gaussian, N(MU, diag(S^2)) in three dimensions, whose denoiser is closed form:
E[eps | x_t] = sqrt(1 - abar) (x_t - sqrt(abar) MU) / (abar S^2 + 1 - abar). Its probability-flow ODE keeps the
standardised z = (x_t - sqrt(abar) MU) / sqrt(abar S^2 + 1 - abar), so the exact flow from x_T to any t is known, and
x0_hat at t is MU + sqrt(abar) S^2 z / sqrt(abar S^2 + 1 - abar). Nothing here trains; the file runs in a few seconds on
one thread.
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch

from genzoo.diffusion import (
    AncestralSampler, DDIMSampler, DPMSolverPlusPlus2M, GaussianDiffusion, GradientGuidance, LossType, ModelMeanType,
    ModelVarType, get_named_beta_schedule, space_timesteps,
)
from genzoo.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, log_normal_bin, normal_kl
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.samplers import DDIMConfig, SamplerConfig

F64 = torch.float64
MU = torch.tensor([0.5, -0.3, 0.0], dtype=F64)
S = torch.tensor([0.2, 0.6, 1.0], dtype=F64)
SMALL, LARGE, LEARNED = ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE, ModelVarType.LEARNED_RANGE
EXACT = dict(rtol=0.0, atol=1e-12)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def process(var: ModelVarType = SMALL, *, schedule: str = "linear", T: int = 1000, clip_range: float | None = None,
            mean: ModelMeanType = ModelMeanType.EPSILON) -> GaussianDiffusion:
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean, model_var_type=var,
                             loss_type=LossType.SIMPLE, clip_range=clip_range)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def gaussian_eps(d: GaussianDiffusion, *, learned: bool = False):
    """The exact E[eps | x_t] of N(MU, diag(S^2)) under ``d`` (original indices); with ``learned``, variance channels
    v = 0.8 tanh(x) that differ per element."""
    abar = torch.as_tensor(d.tables["abar"])

    def model(x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        a = abar[t].view(-1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * S**2 + 1 - a)
        return torch.cat([eps, 0.8 * torch.tanh(x)], dim=1) if learned else eps

    return model


def coefficients(proc: GaussianDiffusion, i: int) -> tuple[float, float, float, float]:
    """abar_i, abar_{i-1} (1 after the last step), b_i = 1 - abar_i / abar_{i-1} and btilde_i, from abar alone."""
    abar = float(proc.tables["abar"][i])
    prev = float(proc.tables["abar"][i - 1]) if i > 0 else 1.0
    b = 1 - abar / prev
    return abar, prev, b, b * (1 - prev) / (1 - abar)


def posterior_mean(proc: GaussianDiffusion, i: int, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar) and the mean of q(x_{t-1} | x_t, x0_hat) (DDPM Eqs. 7, 15)."""
    abar, prev, b, _ = coefficients(proc, i)
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    return x0, math.sqrt(prev) * b / (1 - abar) * x0 + math.sqrt(1 - b) * (1 - prev) / (1 - abar) * x


def step(sampler, proc, model, x, i, *, generator=None, guidance=None, state=None) -> torch.Tensor:
    t = torch.full((x.shape[0],), i, dtype=torch.long)
    return sampler.step(proc, proc.wrap(model), x, t, i, cond=None, guidance=guidance or DiffusionGuidance(),
                        generator=generator, state={} if state is None else state)


# ------------------------------------------------------------------ DDIM at eta 1 is ancestral fixed-small sampling


@pytest.mark.parametrize("clip", [False, True], ids=["unclipped", "clipped"])
@pytest.mark.parametrize("steps", [250, 50, "10,10,3"])
def test_ddim_at_eta_1_is_the_ancestral_fixed_small_sampler_step_for_step(steps, clip: bool) -> None:
    """sigma(eta = 1)^2 = (1 - abar')/(1 - abar) (1 - abar/abar') = btilde, and then sqrt(abar') x0 +
    sqrt(1 - abar' - btilde) eps is the posterior mean (Song et al. 2021, Eq. 16): with one generator seed the two
    samplers agree step for step to 1e-12, clamped x0_hat (clip_range 1; the data reach past it) included."""
    d = process(clip_range=1.0 if clip else None)
    model = gaussian_eps(d)
    ancestral = AncestralSampler(SamplerConfig(steps=steps, clip=clip))
    ddim = DDIMSampler(DDIMConfig(steps=steps, eta=1.0, clip=clip))
    pa, pd = ancestral.respaced(d), ddim.respaced(d)
    x, ga, gd = 1.5 * randn(64, 3, seed=1), gen(2), gen(2)
    for i in range(pa.num_timesteps - 1, -1, -1):
        xa = step(ancestral, pa, model, x, i, generator=ga)
        torch.testing.assert_close(step(ddim, pd, model, x, i, generator=gd), xa, **EXACT)
        x = xa
    assert torch.equal(ga.get_state(), gd.get_state())  # the same number of draws
    noise = randn(64, 3, seed=3)
    a = ancestral.sample(d, model, (64, 3), generator=gen(4), noise=noise)
    torch.testing.assert_close(ddim.sample(d, model, (64, 3), generator=gen(4), noise=noise), a, **EXACT)


# ------------------------------------------------------------------ each sampler's sigma against its formula


@pytest.mark.parametrize("var", [SMALL, LARGE, LEARNED], ids=lambda v: v.value)
def test_ancestral_noise_is_the_square_root_of_its_variance(var: ModelVarType) -> None:
    """x' = mu + sigma z: sigma^2 = btilde (fixed small), b (fixed large), exp(f log b + (1 - f) log btilde) with
    f = (v + 1)/2 (learned range, Improved DDPM Eq. 15), on the respaced process; no draw at the last step."""
    d = process(var, schedule="cosine", T=400)
    sampler = AncestralSampler(SamplerConfig(steps=20, clip=False))
    proc, model = sampler.respaced(d), gaussian_eps(d, learned=var is LEARNED)
    x = randn(16, 3, seed=1)
    for i in (proc.num_timesteps - 1, 9, 1, 0):
        g, z = gen(5), torch.randn(16, 3, generator=gen(5), dtype=F64)
        out = step(sampler, proc, model, x, i, generator=g)
        raw = model(x, torch.full((16,), int(proc.timestep_map[i])), None)
        _, mean = posterior_mean(proc, i, x, raw[:, :3])
        if i == 0:
            torch.testing.assert_close(out, mean, **EXACT)
            assert torch.equal(g.get_state(), gen(5).get_state())
            continue
        _, _, b, btilde = coefficients(proc, i)
        if var is SMALL:
            variance = torch.full_like(x, btilde)
        elif var is LARGE:
            variance = torch.full_like(x, b)
        else:
            f = (raw[:, 3:] + 1) / 2
            variance = torch.exp(f * math.log(b) + (1 - f) * math.log(btilde))
        torch.testing.assert_close(out, mean + variance.sqrt() * z, **EXACT)


@pytest.mark.parametrize("eta", [0.0, 0.35, 1.0])
def test_ddim_draws_the_noise_of_eq_16(eta: float) -> None:
    """x' = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma^2) eps + sigma z, sigma = eta sqrt((1 - abar')/(1 - abar))
    sqrt(1 - abar/abar') (Song et al. 2021, Eqs. 12, 16); no draw at eta 0 nor at the last step."""
    d = process(schedule="cosine", T=400)
    sampler = DDIMSampler(DDIMConfig(steps=20, eta=eta, clip=False))
    proc, model = sampler.respaced(d), gaussian_eps(d)
    x = randn(16, 3, seed=1)
    for i in (proc.num_timesteps - 1, 9, 1, 0):
        g, z = gen(5), torch.randn(16, 3, generator=gen(5), dtype=F64)
        out = step(sampler, proc, model, x, i, generator=g)
        abar, prev, _, _ = coefficients(proc, i)
        sigma = eta * math.sqrt((1 - prev) / (1 - abar)) * math.sqrt(1 - abar / prev)
        eps = model(x, torch.full((16,), int(proc.timestep_map[i])), None)
        x0, _ = posterior_mean(proc, i, x, eps)
        want = math.sqrt(prev) * x0 + math.sqrt(1 - prev - sigma**2) * eps
        drawn = eta > 0 and i > 0
        torch.testing.assert_close(out, want + sigma * z if drawn else want, **EXACT)
        assert torch.equal(g.get_state(), gen(5).get_state()) != drawn


# ------------------------------------------------------------------ deterministic samplers and the exact flow


def test_ddim_is_the_euler_step_of_the_probability_flow_ode() -> None:
    """In x~ = x / alpha and s = sigma / alpha the probability-flow ODE is dx~/ds = eps (Song et al. 2021, Eq. 14), and a
    DDIM step (eta 0) is its Euler step: x~' = x~ + (s' - s) eps_hat, whatever eps_hat the model gives."""
    d = process(schedule="cosine", T=400)
    sampler = DDIMSampler(DDIMConfig(steps=25, clip=False))
    proc = sampler.respaced(d)
    model = lambda x, t, c: torch.sin(3 * x) + 0.01 * t.view(-1, 1)  # noqa: E731  any eps, not the exact one
    x = randn(16, 3, seed=1)
    for i in (proc.num_timesteps - 1, 12, 1, 0):
        abar, prev, _, _ = coefficients(proc, i)
        s, s_next = math.sqrt((1 - abar) / abar), math.sqrt((1 - prev) / prev)
        eps = model(x, torch.full((16,), int(proc.timestep_map[i])), None)
        want = (x / math.sqrt(abar) + (s_next - s) * eps) * math.sqrt(prev)
        torch.testing.assert_close(step(sampler, proc, model, x, i), want, **EXACT)


def test_dpm_solver_2m_is_its_multistep_exponential_integrator() -> None:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) recomputed from abar alone: x' = (sigma'/sigma) x - alpha' (e^-h - 1) D',
    D' = D on the first step, (1 + 1/(2r)) D - (1/(2r)) D_prev after (r = h_prev / h); the last step returns x0_hat."""
    d = process()
    sampler = DPMSolverPlusPlus2M(SamplerConfig(steps=12, clip=False))
    proc, model = sampler.respaced(d), gaussian_eps(d)
    abar = proc.tables["abar"]
    alpha, sigma = np.sqrt(abar), np.sqrt(1 - abar)
    lam = np.log(alpha / sigma)
    x = noise = randn(32, 3, seed=1)
    d_prev = h_prev = None
    for i in range(proc.num_timesteps - 1, 0, -1):
        eps = model(x, torch.full((32,), int(proc.timestep_map[i])), None)
        dd = (x - sigma[i] * eps) / alpha[i]
        if i == 1:
            x = dd
            break
        h = lam[i - 1] - lam[i]
        used = dd if d_prev is None else (1 + h / (2 * h_prev)) * dd - h / (2 * h_prev) * d_prev
        x = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * math.expm1(-h) * used
        d_prev, h_prev = dd, h
    torch.testing.assert_close(sampler.sample(d, model, (32, 3), noise=noise), x, **EXACT)


def exact_flow_x0(d: GaussianDiffusion, x_T: torch.Tensor, e: int) -> torch.Tensor:
    """The exact probability-flow map of the Gaussian data from x_T (t = T) to t = e, then the exact x0_hat there."""
    abar = d.tables["abar"]
    z = (x_T - math.sqrt(abar[-1]) * MU) / (abar[-1] * S**2 + 1 - abar[-1]).sqrt()
    return MU + math.sqrt(abar[e]) * S**2 * z / (abar[e] * S**2 + 1 - abar[e]).sqrt()


def flow_error(sampler, d: GaussianDiffusion) -> float:
    """The largest |x0 - exact| / S over x_T on a grid of [-3, 3]^3 (both maps are affine in x_T per dimension)."""
    x_T = torch.linspace(-3, 3, 7, dtype=F64)[:, None].expand(7, 3)
    e = int(sampler.respaced(d).timestep_map[sampler.last_index])
    x = sampler.sample(d, gaussian_eps(d), (7, 3), noise=x_T)
    return ((x - exact_flow_x0(d, x_T, e)) / S).abs().max().item()


def lambda_linear(T: int = 1601) -> GaussianDiffusion:
    """lambda = log(alpha / sigma) linear in t, 5 at t = 1 to -5 at t = T: the uniform grids of N - 1 dividing T - 1
    are uniform in lambda, so halving the step halves h exactly and the measured orders are clean."""
    abar = 1 / (1 + np.exp(-2 * np.linspace(5.0, -5.0, T)))
    return GaussianDiffusion(betas=1 - abar / np.append(1.0, abar[:-1]), model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=SMALL, loss_type=LossType.SIMPLE, clip_range=None)


@pytest.mark.parametrize(("make", "steps", "order", "largest"), [
    (lambda n: DDIMSampler(DDIMConfig(steps=n, clip=False)), (17, 33, 65, 129), 1.0, 0.48),
    (lambda n: DPMSolverPlusPlus2M(SamplerConfig(steps=n - 1, clip=False)), (33, 65, 129, 257), 2.0, 0.019),
], ids=["ddim", "dpm-solver++2m"])
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(make, steps, order: float, largest: float) -> None:
    """DDIM (first order) and DPM-Solver++(2M) (second order) against the exact flow of Gaussian data on a grid uniform
    in lambda: each halving of the step divides the error by 2^order (+-0.15 in the exponent), and the error at the
    fewest steps is below ``largest``. Measured (errors in data standard deviations; orders): DDIM 0.434, 0.226, 0.115,
    0.058 (0.94, 0.97, 0.98); DPM-Solver++(2M) 0.0177, 0.0045, 0.0011, 0.00029 (1.96, 1.99, 2.00)."""
    d = lambda_linear()
    errors = [flow_error(make(n), d) for n in steps]
    found = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(p - order) < 0.15 for p in found) and errors[0] < largest, (errors, found)


# ------------------------------------------------------------------ guidance


class ConstantGradient(GradientGuidance):
    """grad log p(c | x_t) = g everywhere, scaled by ``scale``."""

    def __init__(self, g: torch.Tensor, scale: float) -> None:
        self.g, self.scale, self.seen = g, scale, []

    def grad_log_p(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.seen.append(t.tolist())
        return self.g.expand_as(x_t).clone()


def sigma_of(var: ModelVarType, proc: GaussianDiffusion, i: int, raw: torch.Tensor) -> torch.Tensor:
    """The reverse-step variance Sigma at index i from its definition; btilde_1 = 0 and the first log-variances use
    btilde_2 (Improved DDPM Sec. 3.1)."""
    _, _, b, btilde = coefficients(proc, i)
    clipped = coefficients(proc, 1)[3] if i == 0 else btilde
    if var is SMALL:
        return torch.full_like(raw[:, :3], btilde)
    if var is LARGE:
        return torch.full_like(raw[:, :3], clipped if i == 0 else b)
    f = (raw[:, 3:] + 1) / 2
    return torch.exp(f * math.log(b) + (1 - f) * math.log(clipped))


@pytest.mark.parametrize("var", [SMALL, LARGE, LEARNED], ids=lambda v: v.value)
def test_condition_mean_moves_the_mean_by_exactly_sigma_g(var: ModelVarType) -> None:
    """mu' = mu + s Sigma g (Dhariwal & Nichol 2021, Alg. 1) for a constant gradient g, with Sigma the respaced process's
    variance of each type (0 at t = 1 for fixed small: guidance leaves the last step alone); the variance and x0_hat stay.
    An ancestral step moves by the same amount from the same noise, and the gradient sees original indices."""
    d = process(var, schedule="cosine", T=200)
    proc = d.respace(space_timesteps(200, 20))
    model, g = gaussian_eps(d, learned=var is LEARNED), torch.tensor([0.7, -1.3, 2.0], dtype=F64)
    guidance, sampler = ConstantGradient(g, scale=2.5), AncestralSampler(SamplerConfig(steps=20, clip=False))
    x = randn(8, 3, seed=1)
    for i in (19, 10, 1, 0):
        t = torch.full((8,), i)
        raw = proc.wrap(model)(x, t, None)
        pred = proc.p_mean_variance(raw, x, t)
        moved = guidance.condition_mean(proc, pred, x, t, None)
        shift = 2.5 * sigma_of(var, proc, i, raw) * g
        torch.testing.assert_close(moved.mean - pred.mean, shift, rtol=1e-12, atol=1e-15)
        assert torch.equal(moved.variance, pred.variance) and torch.equal(moved.pred_xstart, pred.pred_xstart)
        assert guidance.seen[-1] == [int(proc.timestep_map[i])] * 8
        guided = step(sampler, proc, model, x, i, generator=gen(6), guidance=guidance)
        torch.testing.assert_close(guided - step(sampler, proc, model, x, i, generator=gen(6)), shift, rtol=1e-10, atol=1e-13)


def test_condition_eps_shifts_eps_by_sqrt_one_minus_abar_s_g_and_the_mean_follows() -> None:
    """eps' = eps - sqrt(1 - abar) s g (Dhariwal & Nichol 2021, Alg. 2): x0_hat moves by (1 - abar)/sqrt(abar) s g and the
    mean by the posterior's x0 coefficient times that; the variance stays."""
    d = process(schedule="cosine", T=200)
    proc = d.respace(space_timesteps(200, 20))
    g = torch.tensor([0.7, -1.3, 2.0], dtype=F64)
    x = randn(8, 3, seed=1)
    for i in (19, 10, 1, 0):
        t = torch.full((8,), i)
        pred = proc.p_mean_variance(proc.wrap(gaussian_eps(d))(x, t, None), x, t)
        moved = ConstantGradient(g, scale=2.5).condition_eps(proc, pred, x, t, None)
        abar, prev, b, _ = coefficients(proc, i)
        torch.testing.assert_close(moved.pred_eps - pred.pred_eps, (-math.sqrt(1 - abar) * 2.5 * g).expand_as(x), **EXACT)
        dx0 = (1 - abar) / math.sqrt(abar) * 2.5 * g
        torch.testing.assert_close(moved.pred_xstart - pred.pred_xstart, dx0.expand_as(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(moved.mean - pred.mean, (math.sqrt(prev) * b / (1 - abar) * dx0).expand_as(x),
                                   rtol=1e-10, atol=1e-12)
        assert torch.equal(moved.variance, pred.variance)


# ------------------------------------------------------------------ likelihoods at the exact CDF's precision

mpmath.mp.dps = 40


def exact_log_bin(lo: float, hi: float) -> float:
    """log(Phi(hi) - Phi(lo)) in 40 digits (mpmath), mirrored in the right tail where both are 1 - tiny; lo = -inf or
    hi = inf for the edge bins."""
    if lo > 0:
        lo, hi = -hi, -lo
    return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


@pytest.mark.parametrize(("mean", "scale"), [(0.1, 0.3), (0.98, 0.02), (-1.0, 0.005), (0.0, 3.0), (0.37, 1e-4), (1.6, 0.05)])
def test_discretised_likelihood_is_the_exact_bin_probability(mean: float, scale: float) -> None:
    """log P(bin) = log(Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s)), the edge bins open to -inf and +inf (DDPM
    Eq. 13): the 256 probabilities sum to one to 1e-12 and each log P matches 40-digit arithmetic to 1e-10 (relative),
    hundreds of nats deep in the tails included. improved-diffusion's tanh CDF is off by ~1e-4."""
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    logp = discretized_gaussian_log_likelihood(bins, means=torch.tensor(mean, dtype=F64),
                                               log_scales=torch.tensor(math.log(scale), dtype=F64))
    assert abs(logp.exp().sum().item() - 1) < 1e-12
    for k in (0, 1, 37, 127, 128, 200, 254, 255):
        x = bins[k].item()
        lo = -mpmath.inf if k == 0 else (mpmath.mpf(x) - mpmath.mpf(1) / 255 - mean) / scale
        hi = mpmath.inf if k == 255 else (mpmath.mpf(x) + mpmath.mpf(1) / 255 - mean) / scale
        want = exact_log_bin(lo, hi)
        assert logp[k].item() == pytest.approx(want, rel=1e-10, abs=1e-12), (k, logp[k].item(), want)


def test_log_normal_bin_is_exact_in_both_tails_with_a_gradient() -> None:
    """log(Phi(b) - Phi(a)) to 1e-10 from 40 sigma left to 40 sigma right, and a finite non-zero gradient in the tails."""
    a = torch.tensor([-40.0, -8.0, -1.0, -0.01, 0.5, 6.0, 39.0], dtype=F64, requires_grad=True)
    width = torch.tensor([0.5, 0.01, 2.0, 0.02, 1e-6, 0.3, 1.0], dtype=F64)
    got = log_normal_bin(a, a + width)
    for k in range(len(a)):
        want = exact_log_bin(mpmath.mpf(a[k].item()), mpmath.mpf(a[k].item()) + mpmath.mpf(width[k].item()))
        assert got[k].item() == pytest.approx(want, rel=1e-10), (k, got[k].item(), want)
    (grad,) = torch.autograd.grad(got.sum(), a)
    assert torch.isfinite(grad).all() and (grad[[0, 1, 5, 6]].abs() > 1e-3).all()


def test_decoder_term_of_the_bpd_loop_to_the_exact_cdf_precision() -> None:
    """A model that knows x0 makes every KL term 0, so the NLL bound is L_T plus -log2 P(bin | N(x0, btilde_2)):
    matched to 1e-10 (the exact CDF), where test_diffusion_math's version allowed 2e-3."""
    d = process(T=100)
    x0 = torch.tensor([[-1.0, 0.0, 1.0], [127 / 127.5 - 1, 200 / 127.5 - 1, 3 / 127.5 - 1]], dtype=F64)
    sqrt_abar, sqrt_1m = torch.as_tensor(d.tables["sqrt_abar"]), torch.as_tensor(d.tables["sqrt_one_minus_abar"])
    oracle = lambda x, t, c: (x - sqrt_abar[t, None] * x0) / sqrt_1m[t, None]  # noqa: E731
    out = d.calc_bpd_loop(oracle, x0, generator=gen(0))
    assert out["vb"][:, 1:].abs().max() < 1e-12
    sigma = math.sqrt(coefficients(d, 1)[3])  # the fixed-small log variance at t = 1 is clipped to log btilde_2
    u = mpmath.mpf(1) / 255 / sigma
    interior = -exact_log_bin(-u, u) / math.log(2)
    edge = -exact_log_bin(-mpmath.inf, u) / math.log(2)
    decoder = torch.tensor([(2 * edge + interior) / 3, interior], dtype=F64)
    torch.testing.assert_close(out["vb"][:, 0], decoder, rtol=1e-10, atol=0)
    abar_T = d.tables["abar"][-1]
    prior = 0.5 * (-1 - math.log(1 - abar_T) + (1 - abar_T) + abar_T * x0.pow(2)).mean(1) / math.log(2)
    torch.testing.assert_close(out["prior_bpd"], prior, rtol=1e-12, atol=0)
    torch.testing.assert_close(out["total_bpd"], prior + out["vb"].sum(1), rtol=1e-12, atol=0)


def test_vlb_term_is_the_gaussian_kl_in_bits_per_dim() -> None:
    """For t > 1, L_{t-1} = KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) / log 2 averaged over dims; a model eps off by
    delta moves the mean by c0 sqrt(1 - abar)/sqrt(abar) delta, so the KL is that squared over 2 btilde (fixed small)."""
    d = process(T=100)
    x0, eps, t = randn(3, 4, seed=1).clamp(-1, 1), randn(3, 4, seed=2), torch.tensor([5, 40, 99])
    x_t = d.q_sample(x0, t, eps)
    delta = randn(3, 4, seed=3)
    got = d.vb_terms_bpd(eps + delta, x0, x_t, t)
    for row, i in enumerate(t.tolist()):
        abar, prev, b, btilde = coefficients(d, i)
        dmean = math.sqrt(prev) * b / (1 - abar) * math.sqrt(1 - abar) / math.sqrt(abar) * delta[row]
        want = (dmean**2 / (2 * btilde)).mean().item() / math.log(2)
        assert got[row].item() == pytest.approx(want, rel=1e-10)
    m1, m2, l1, l2 = randn(5, seed=4), randn(5, seed=5), randn(5, seed=6), randn(5, seed=7)
    want = 0.5 * (l2 - l1 + torch.exp(l1 - l2) + (m1 - m2) ** 2 / torch.exp(l2) - 1)
    torch.testing.assert_close(normal_kl(m1, l1, m2, l2), want, rtol=1e-12, atol=1e-14)
