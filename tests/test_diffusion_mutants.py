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
one thread. The second half kills survivors of `make mutation` (devices, dtypes, the condition's path through a step,
the solvers' step formulas on uneven grids, the churn plan, exact grids).
"""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from tiny import gaussian_diffusion, lambda_linear

from genzoo.diffusion import (
    AncestralSampler,
    DDIMSampler,
    DPMSolverPlusPlus2M,
    GaussianDiffusion,
    GradientGuidance,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
    space_timesteps,
)
from genzoo.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood, log_normal_bin, normal_kl
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.samplers import DDIMConfig, SamplerConfig

F64 = torch.float64
MU = torch.tensor([0.5, -0.3, 0.0], dtype=F64)
S = torch.tensor([0.2, 0.6, 1.0], dtype=F64)
SMALL, LARGE, LEARNED = ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE, ModelVarType.LEARNED_RANGE
EXACT = dict(rtol=0.0, atol=1e-12)


pytestmark = pytest.mark.usefixtures("one_thread")


def process(
    var: ModelVarType = SMALL,
    *,
    schedule: str = "linear",
    T: int = 1000,
    clip_range: float | None = None,
    mean: ModelMeanType = ModelMeanType.EPSILON,
) -> GaussianDiffusion:
    return gaussian_diffusion(T, schedule, mean=mean, var=var, clip_range=clip_range)


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


def log_snr(sampler):
    """``sampler``'s respacing of process(), the exact eps model of the data, and alpha = sqrt(abar), sigma =
    sqrt(1 - abar) and lambda = log(alpha / sigma) at its steps."""
    d = process()
    proc = sampler.respaced(d)
    alpha, sigma = np.sqrt(proc.tables["abar"]), np.sqrt(1 - proc.tables["abar"])
    return proc, gaussian_eps(d), alpha, sigma, np.log(alpha / sigma)


def coefficients(proc: GaussianDiffusion, i: int) -> tuple[float, float, float, float]:
    """abar_i, abar_{i-1} (1 after the last step), b_i = 1 - abar_i / abar_{i-1} and btilde_i, from abar alone."""
    abar = float(proc.tables["abar"][i])
    prev = float(proc.tables["abar"][i - 1]) if i > 0 else 1.0
    b = 1 - abar / prev
    return abar, prev, b, b * (1 - prev) / (1 - abar)


def posterior_mean(
    proc: GaussianDiffusion, i: int, x: torch.Tensor, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0_hat = (x - sqrt(1 - abar) eps) / sqrt(abar) and the mean of q(x_{t-1} | x_t, x0_hat) (DDPM Eqs. 7, 15)."""
    abar, prev, b, _ = coefficients(proc, i)
    x0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    return x0, math.sqrt(prev) * b / (1 - abar) * x0 + math.sqrt(1 - b) * (1 - prev) / (1 - abar) * x


def step(sampler, proc, model, x, i, *, generator=None, guidance=None, state=None) -> torch.Tensor:
    t = torch.full((x.shape[0],), i, dtype=torch.long)
    return sampler.step(
        proc,
        proc.wrap(model),
        x,
        t,
        i,
        cond=None,
        guidance=guidance or DiffusionGuidance(),
        generator=generator,
        state={} if state is None else state,
    )


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
    """In x~ = x / alpha and s = sigma / alpha the probability-flow ODE is dx~/ds = eps (Song et al. 2021, Eq. 14),
    and a
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
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) recomputed from abar alone: x' = (sigma'/sigma) x - alpha' (e^-h -
    1) D',
    D' = D on the first step, (1 + 1/(2r)) D - (1/(2r)) D_prev after (r = h_prev / h); the last step returns x0_hat."""
    sampler = DPMSolverPlusPlus2M(SamplerConfig(steps=12, clip=False))
    proc, model, alpha, sigma, lam = log_snr(sampler)
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
    torch.testing.assert_close(sampler.sample(process(), model, (32, 3), noise=noise), x, **EXACT)


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


@pytest.mark.parametrize(
    ("make", "steps", "order", "largest"),
    [
        (lambda n: DDIMSampler(DDIMConfig(steps=n, clip=False)), (17, 33, 65, 129), 1.0, 0.48),
        (lambda n: DPMSolverPlusPlus2M(SamplerConfig(steps=n - 1, clip=False)), (33, 65, 129, 257), 2.0, 0.019),
    ],
    ids=["ddim", "dpm-solver++2m"],
)
def test_deterministic_samplers_converge_to_the_exact_flow_at_their_order(
    make, steps, order: float, largest: float
) -> None:
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
    """mu' = mu + s Sigma g (Dhariwal & Nichol 2021, Alg. 1) for a constant gradient g, with Sigma the respaced
    process's
    variance of each type (0 at t = 1 for fixed small: guidance leaves the last step alone); the variance and
    x0_hat stay.
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
        torch.testing.assert_close(
            guided - step(sampler, proc, model, x, i, generator=gen(6)), shift, rtol=1e-10, atol=1e-13
        )


class OnPrediction(ConstantGradient):
    """Records the prediction ``gradient`` is handed (a guidance defined on x0_hat reads it, as CLIP guidance does)."""

    def gradient(self, diffusion, x_t, t, cond, pred=None):
        self.seen.append(pred)
        return super().gradient(diffusion, x_t, t, cond, pred)


def test_a_gradient_guidance_is_handed_the_steps_unguided_prediction() -> None:
    d = process(schedule="cosine", T=200)
    x, t = randn(4, 3, seed=2), torch.full((4,), 120)
    pred = d.p_mean_variance(d.wrap(gaussian_eps(d))(x, t, None), x, t)
    for condition in ("condition_mean", "condition_eps"):
        guidance = OnPrediction(torch.ones(3, dtype=F64), scale=1.0)
        getattr(guidance, condition)(d, pred, x, t, None)
        assert guidance.seen[0] is pred


def test_condition_eps_shifts_eps_by_sqrt_one_minus_abar_s_g_and_the_mean_follows() -> None:
    """eps' = eps - sqrt(1 - abar) s g (Dhariwal & Nichol 2021, Alg. 2): x0_hat moves by (1 - abar)/sqrt(abar) s g
    and the
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
        torch.testing.assert_close(
            moved.pred_eps - pred.pred_eps, (-math.sqrt(1 - abar) * 2.5 * g).expand_as(x), **EXACT
        )
        dx0 = (1 - abar) / math.sqrt(abar) * 2.5 * g
        torch.testing.assert_close(moved.pred_xstart - pred.pred_xstart, dx0.expand_as(x), rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(
            moved.mean - pred.mean, (math.sqrt(prev) * b / (1 - abar) * dx0).expand_as(x), rtol=1e-10, atol=1e-12
        )
        assert torch.equal(moved.variance, pred.variance)
        assert torch.equal(moved.model_eps, moved.pred_eps)  # what DDIM's clipped_eps: false steps with


# ------------------------------------------------------------------ likelihoods at the exact CDF's precision

mpmath.mp.dps = 40


def exact_log_bin(lo: float, hi: float) -> float:
    """log(Phi(hi) - Phi(lo)) in 40 digits (mpmath), mirrored in the right tail where both are 1 - tiny; lo = -inf or
    hi = inf for the edge bins."""
    if lo > 0:
        lo, hi = -hi, -lo
    return float(mpmath.log(mpmath.ncdf(hi) - mpmath.ncdf(lo)))


@pytest.mark.parametrize(
    ("mean", "scale"), [(0.1, 0.3), (0.98, 0.02), (-1.0, 0.005), (0.0, 3.0), (0.37, 1e-4), (1.6, 0.05)]
)
def test_discretised_likelihood_is_the_exact_bin_probability(mean: float, scale: float) -> None:
    """log P(bin) = log(Phi((x + 1/255 - m)/s) - Phi((x - 1/255 - m)/s)), the edge bins open to -inf and +inf (DDPM
    Eq. 13): the 256 probabilities sum to one to 1e-12 and each log P matches 40-digit arithmetic to 1e-10 (relative),
    hundreds of nats deep in the tails included. improved-diffusion's tanh CDF is off by ~1e-4."""
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.tensor(mean, dtype=F64), log_scales=torch.tensor(math.log(scale), dtype=F64)
    )
    assert abs(logp.exp().sum().item() - 1) < 1e-12
    for k in (0, 1, 37, 127, 128, 200, 254, 255):
        x = bins[k].item()
        lo = -mpmath.inf if k == 0 else (mpmath.mpf(x) - mpmath.mpf(1) / 255 - mean) / scale
        hi = mpmath.inf if k == 255 else (mpmath.mpf(x) + mpmath.mpf(1) / 255 - mean) / scale
        want = exact_log_bin(lo, hi)
        assert logp[k].item() == pytest.approx(want, rel=1e-10, abs=1e-12), (k, logp[k].item(), want)


def test_log_normal_bin_is_exact_in_both_tails_with_a_gradient() -> None:
    """log(Phi(b) - Phi(a)) to 1e-10 from 40 sigma left to 40 sigma right, and a finite non-zero gradient in the
    tails."""
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
    delta moves the mean by c0 sqrt(1 - abar)/sqrt(abar) delta, so the KL is that squared over 2 btilde (fixed
    small)."""
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


# ------------------------------------------------------------------ survivors of `make mutation` (docs/diffusion.md)
# Each test below kills mutants that the tests above and the other fast diffusion tests let through. Devices are
# checked on PyTorch's "meta" device, which runs every shape computation without data: a CPU-only machine still sees
# a tensor left on the wrong device.

META = torch.device("meta")


def test_noise_is_drawn_on_the_generator_device_and_placed_with_the_input() -> None:
    """``samplers.randn``: drawn by the generator on its own device (a CPU generator reproduces CUDA runs), then
    moved to
    x_like's device; without a generator, drawn directly on the requested device (the global CPU RNG untouched)."""
    from genzoo.diffusion.samplers import randn as draw

    g = gen(3)
    z = draw((2, 3), torch.zeros(1, device=META), generator=g)
    assert z.device == META and z.dtype == torch.float32
    assert not torch.equal(g.get_state(), gen(3).get_state())  # drawn by the CPU generator
    cpu = draw((2, 3), torch.zeros(1, dtype=F64), generator=gen(3))
    torch.testing.assert_close(cpu, torch.randn(2, 3, generator=gen(3), dtype=F64), rtol=0, atol=0)
    before = torch.random.get_rng_state()
    z = draw((2, 3), None, generator=None, device=META, dtype=F64)
    assert z.device == META and z.dtype == F64 and torch.equal(torch.random.get_rng_state(), before)


def test_timestep_samplers_return_tensors_on_the_device_asked_for_and_cover_every_t() -> None:
    """Uniform t over {0..T-1} (t = 0, the decoder term, included) with unit weights; loss-aware weights 1 / (T p_t).
    Both on the device asked for; the loss-aware history is checkpointed with integer counts."""
    from genzoo.diffusion.gaussian_diffusion import LossAwareSampler, UniformSampler

    for sampler in (UniformSampler(4), LossAwareSampler(4)):
        t, w = sampler.sample(3, META)
        assert t.device == META and w.device == META and t.dtype == torch.long and w.dtype == torch.float32
    torch.manual_seed(0)
    t, w = UniformSampler(4).sample(400, torch.device("cpu"))
    assert set(t.tolist()) == {0, 1, 2, 3} and torch.equal(w, torch.ones(400))
    s = LossAwareSampler(3)
    assert s.count.dtype == torch.long and s.history.dtype == F64
    assert s.weights().dtype == F64 and torch.equal(s.weights(), torch.ones(3, dtype=F64))


def test_prediction_from_xstart_recomputes_eps_and_the_mean() -> None:
    """A guided x0_hat processed again: eps = (x_t - sqrt(abar) x0)/sqrt(1 - abar) and the posterior mean at x0
    follow; the
    variance stays."""
    d = process(schedule="cosine", T=50)
    x, t = randn(4, 3, seed=1), torch.tensor([0, 7, 30, 49])
    pred = d.p_mean_variance(randn(4, 3, seed=2), x, t)
    x0 = randn(4, 3, seed=3).clamp(-1, 1)
    new = d.prediction_from_xstart(pred, x, t, x0)
    mean, _, _ = d.q_posterior_mean_variance(x0, x, t)
    torch.testing.assert_close(new.mean, mean, **EXACT)
    torch.testing.assert_close(new.pred_xstart, x0, rtol=0, atol=0)
    abar = torch.as_tensor(d.tables["abar"])[t].view(-1, 1)
    torch.testing.assert_close(new.pred_eps, (x - abar.sqrt() * x0) / (1 - abar).sqrt(), rtol=1e-12, atol=1e-12)
    assert torch.equal(new.variance, pred.variance)


def test_training_loss_uses_the_given_noise_for_x_t() -> None:
    """x_t = sqrt(abar) x0 + sqrt(1 - abar) noise with the caller's noise: a model that returns x_t itself has the loss
    mean((noise - x_t)^2), deterministic."""
    d = process(T=100)
    x0, noise, t = randn(3, 4, seed=1), randn(3, 4, seed=2), torch.tensor([0, 50, 99])
    terms = d.training_losses(lambda x, tt, c: x, x0, t, noise=noise)
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(terms["loss"], (noise - x_t).pow(2).mean(1), **EXACT)


class CondGradient(GradientGuidance):
    """grad log p(c | x_t) = cond["g"]: a gradient that depends on the condition (returned in float32)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def grad_log_p(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        assert cond["name"] == "kept"  # non-tensor values pass through to the guidance unchanged
        return cond["g"].float().expand_as(x_t).clone()


def test_an_ancestral_step_passes_the_condition_to_the_model_and_the_guidance() -> None:
    """mu' = mu(model(x, t, cond)) + s Sigma grad log p(c | x_t): both see the caller's condition; the gradient comes
    back in x's dtype."""
    d = process(schedule="cosine", T=100)
    sampler = AncestralSampler(SamplerConfig(steps=10, clip=False))
    proc = sampler.respaced(d)
    model = lambda x, t, c: x * c["k"]  # noqa: E731  an eps that depends on the condition
    cond = {"k": torch.full((5, 1), 0.3, dtype=F64), "g": torch.tensor([1.0, -2.0, 0.5]), "name": "kept"}
    x, i = randn(5, 3, seed=1), 6
    guidance = CondGradient(scale=1.5)
    t = torch.full((5,), i)
    assert guidance.gradient(proc, x, t, cond).dtype == F64
    out = sampler.step(proc, proc.wrap(model), x, t, i, cond=cond, guidance=guidance, generator=gen(4), state={})
    _, mean = posterior_mean(proc, i, x, 0.3 * x)
    _, _, _, btilde = coefficients(proc, i)
    z = torch.randn(5, 3, generator=gen(4), dtype=F64)
    want = mean + btilde * 1.5 * cond["g"].double() + math.sqrt(btilde) * z
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_classifier_guidance_declares_its_condition_and_says_what_is_missing() -> None:
    from genzoo.diffusion import ClassifierGuidance

    guidance = ClassifierGuidance(lambda x, t: x, scale=1.0)
    assert guidance.needs_condition == frozenset({"y"})
    message = r"^classifier guidance needs a class: pass condition \{'y': \.\.\.\} \(CLI: --class K\)$"
    with pytest.raises(ValueError, match=message):
        guidance.grad_log_p(randn(2, 3), torch.zeros(2, dtype=torch.long), None)


def test_cfg_without_a_condition_is_the_plain_model_and_marks_the_null_half_on_the_input_device() -> None:
    from genzoo.diffusion import ClassifierFreeGuidance
    from genzoo.diffusion.guidance import CFGConfig

    cfg = ClassifierFreeGuidance(CFGConfig(scale=3.0))
    model = lambda x, t, c: x * (1 + t.view(-1, 1)) if c is None else x + 100  # noqa: E731
    x, t = randn(2, 3), torch.tensor([1, 2])
    torch.testing.assert_close(cfg.model_output(model, x, t, None), x * (1 + t.view(-1, 1)), rtol=0, atol=0)
    seen = {}

    def spy(x, t, c):
        seen.update(c)
        return x

    cfg.model_output(
        spy,
        torch.zeros(2, 3, device=META),
        torch.zeros(2, dtype=torch.long, device=META),
        {"y": torch.zeros(2, dtype=torch.long, device=META)},
    )
    assert seen["drop"].device == META and seen["drop"].shape == (4,)


def test_q_sample_draws_its_own_noise_when_none_is_given() -> None:
    d = process(T=100)
    x0, t = randn(3, 4, seed=1), torch.tensor([0, 50, 99])
    torch.manual_seed(7)
    drawn = d.q_sample(x0, t)
    torch.manual_seed(7)
    torch.testing.assert_close(drawn, d.q_sample(x0, t, torch.randn_like(x0)), rtol=0, atol=0)


def test_hybrid_loss_with_a_fixed_variance_and_the_clamped_vlb() -> None:
    """L_hybrid also runs on a fixed variance (its vlb then trains nothing); ``vb_terms_bpd`` applies ``process_xstart``
    (the clamp ``calc_bpd_loop`` uses) before forming the model's mean."""
    d = gaussian_diffusion(100, loss=LossType.HYBRID)
    x0, noise, t = randn(3, 4, seed=1).clamp(-1, 1), randn(3, 4, seed=2), torch.tensor([3, 50, 99])
    model = lambda x, tt, c: 2 * x  # noqa: E731
    terms = d.training_losses(model, x0, t, noise=noise)
    x_t = d.q_sample(x0, t, noise)
    torch.testing.assert_close(terms["vlb"], d.vb_terms_bpd(2 * x_t, x0, x_t, t), **EXACT)
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 100 * terms["vlb"], **EXACT)
    clamp = lambda x: x.clamp(-1, 1)  # noqa: E731
    clamped = d.vb_terms_bpd(2 * x_t, x0, x_t, t, process_xstart=clamp)
    true_mean, _, true_logvar = d.q_posterior_mean_variance(x0, x_t, t)
    mean, _, _ = d.q_posterior_mean_variance(clamp(d._predict_xstart_from_eps(x_t, t, 2 * x_t)), x_t, t)
    logvar = torch.as_tensor(d.tables["posterior_log_variance_clipped"])[t].view(-1, 1)
    want = normal_kl(true_mean, true_logvar, mean, logvar.expand_as(mean)).mean(1) / math.log(2)
    torch.testing.assert_close(clamped, want, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(clamped, d.vb_terms_bpd(2 * x_t, x0, x_t, t))  # the clamp binds here


def test_prior_bpd_runs_on_the_input_device() -> None:
    d = process(T=100)
    assert d.prior_bpd(torch.zeros(2, 3, device=META)).device == META


def test_mixture_draws_follow_the_generator() -> None:
    """``GaussianMixture.sample`` takes both the components and the noise from the generator: one seed, one sample, and
    the global RNG is not used."""
    from genzoo.diffusion.gmm import small_variance_mixture

    gmm = small_variance_mixture()
    torch.manual_seed(0)
    a, ka = gmm.sample(50, gen(1))
    torch.manual_seed(1)
    b, kb = gmm.sample(50, gen(1))
    assert torch.equal(a, b) and torch.equal(ka, kb)
    g = gen(1)
    k = torch.multinomial(gmm.weights, 50, replacement=True, generator=g)
    z = torch.randn(50, 2, 1, generator=g, dtype=F64)
    torch.testing.assert_close(
        a, gmm.means[k] + (torch.linalg.cholesky(gmm.covs)[k] @ z).squeeze(-1), rtol=0, atol=1e-15
    )


def test_exact_classifier_gradient_keeps_the_input_dtype() -> None:
    from genzoo.diffusion.gmm import ExactDenoiser, small_variance_mixture

    exact = ExactDenoiser(small_variance_mixture(), process(T=100))
    g = exact.grad_log_p_y(torch.zeros(2, 2), torch.tensor([3, 50]), torch.tensor([0, 2]))
    assert g.dtype == torch.float32
    assert exact.classifier(torch.zeros(2, 2), torch.tensor([3, 50])).dtype == torch.float32


def test_the_small_variance_mixture_is_as_documented() -> None:
    """Three 2-D components, weights 0.5 / 0.3 / 0.2, per-axis standard deviations 0.17-0.22, means 0.53-0.67 apart
    (gmm.py's docstring says 0.6-0.7; the closest pair, components 2 and 3, is 0.53 apart)."""
    from genzoo.diffusion.gmm import small_variance_mixture

    gmm = small_variance_mixture()
    assert gmm.weights.dtype == gmm.means.dtype == gmm.covs.dtype == F64
    assert gmm.weights.tolist() == [0.5, 0.3, 0.2] and gmm.means.shape == (3, 2) and gmm.covs.shape == (3, 2, 2)
    std = gmm.covs.diagonal(dim1=1, dim2=2).sqrt()
    assert 0.17 < std.min() and std.max() < 0.23
    assert torch.equal(gmm.covs, gmm.covs.transpose(1, 2)) and (torch.linalg.eigvalsh(gmm.covs) > 0.02).all()
    gaps = torch.pdist(gmm.means)
    assert 0.53 < gaps.min() and gaps.max() < 0.67
    torch.testing.assert_close(gmm.means.mean(0), torch.tensor([0.05 / 3, 0.7 / 3], dtype=F64))
    torch.testing.assert_close(gmm.covs.sum(0), torch.tensor([[0.115, 0.0], [0.0, 0.115]], dtype=F64))


def test_sde_noise_scale_at_a_partial_eta() -> None:
    """DPM-Solver++(3M) SDE's noise sigma' sqrt(1 - e^(-2 eta h)), at eta 0.5 (eta 1 hides eta * h against h / eta)."""
    from genzoo.diffusion import solvers

    sde = solvers.DPMSolverPlusPlus3MSDE(solvers.SDEConfig(eta=0.5))
    assert sde.noise_scale(0.7, 0.3) == pytest.approx(0.7 * math.sqrt(1 - math.exp(-0.3)), rel=1e-14)


def test_the_churn_plan_is_built_once_per_process() -> None:
    from genzoo.diffusion import solvers

    sampler = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=2.0, clip=False))
    d, other = process(T=200), process(T=200)
    first = sampler.churn_plan(d)
    second = sampler.churn_plan(d)
    assert first[1] is second[1] and first[0] is second[0]
    assert sampler.churn_plan(other)[1] is not first[1]


def test_dpm_solver_3m_step_is_its_formula_on_uneven_steps() -> None:
    """DPM-Solver++(3M) (solvers.py's docstring) on a grid uniform in t, so uneven in lambda (r0 != r1 != 1, where the
    order tests' even grid cannot tell d2's 2 / (r0 + r1) from its inverse): x' = (sigma'/sigma) x - alpha' (e^-h -
    1) D0
    + alpha' (phi2 d1 - phi3 d2)."""
    from genzoo.diffusion import solvers

    sampler = solvers.DPMSolverPlusPlus3M(solvers.MultistepConfig(steps=12, grid="uniform", clip=False))
    proc, model, alpha, sigma, lam = log_snr(sampler)
    i, x, d1_, d2_ = 6, randn(8, 3, seed=1), randn(8, 3, seed=5), randn(8, 3, seed=6)
    state = {"d": [d2_, d1_], "h": [lam[i + 1] - lam[i + 2], lam[i] - lam[i + 1]]}
    out = step(sampler, proc, model, x, i, state=state)
    eps = model(x, torch.full((8,), int(proc.timestep_map[i])), None)
    d0 = (x - sigma[i] * eps) / alpha[i]
    h = lam[i - 1] - lam[i]
    r0, r1 = (lam[i] - lam[i + 1]) / h, (lam[i + 1] - lam[i + 2]) / h
    assert abs(r0 - r1) > 0.05 and abs(r0 - 1) > 0.05
    d10, d11 = (d0 - d1_) / r0, (d1_ - d2_) / r1
    dd1, dd2 = d10 + r0 / (r0 + r1) * (d10 - d11), 2 * (d10 - d11) / (r0 + r1)
    phi2 = math.expm1(-h) / h + 1
    phi3 = phi2 / h - 0.5
    want = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * math.expm1(-h) * d0 + alpha[i - 1] * (phi2 * dd1 - phi3 * dd2)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    assert len(state["d"]) == 2 and state["h"][-1] == pytest.approx(h, rel=1e-15)
    torch.testing.assert_close(state["d"][-1], d0, **EXACT)


def test_unipc_last_step_denoises_with_the_corrected_point() -> None:
    """UniPC's last point is corrected, then x0 = D + (x_corrected - x) / alpha (the eps its evaluation implies),
    with an
    alpha far from 1 here (grid point t = 334 of 1000)."""
    from genzoo.diffusion import solvers

    class ShiftingCorrector(solvers.UniPC):
        def update(self, x, ds, i, proc, order, new=None):
            return x + 0.25 if new is not None else super().update(x, ds, i, proc, order, new)

    d = process()
    sampler = ShiftingCorrector(solvers.UniPCConfig(steps=3, grid="uniform", clip=False))
    proc, model = sampler.respaced(d), gaussian_eps(d)
    x, x_prev = randn(8, 3, seed=1), randn(8, 3, seed=2)
    # "raw": the predictor's output the previous step returned, here the point reached (no after_step moved it)
    out = step(sampler, proc, model, x, 1, state={"d": [randn(8, 3, seed=3)], "x": x_prev, "order": 1, "raw": x})
    abar = float(proc.tables["abar"][1])
    eps = model(x, torch.full((8,), int(proc.timestep_map[1])), None)
    d0 = (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)
    assert math.sqrt(abar) < 0.8
    torch.testing.assert_close(out, d0 + (x_prev + 0.25 - x) / math.sqrt(abar), **EXACT)
    # an after_step moved the predictor's output r to x: the correction is the shift corrected - r, applied at x
    r = randn(8, 3, seed=4)
    out = step(sampler, proc, model, x, 1, state={"d": [randn(8, 3, seed=3)], "x": x_prev, "order": 1, "raw": r})
    torch.testing.assert_close(out, d0 + (x_prev + 0.25 - r) / math.sqrt(abar), **EXACT)
    clipped = ShiftingCorrector(solvers.UniPCConfig(steps=3, grid="uniform"))  # clip: the x0 is clamped as x0_hat is
    d1 = process(clip_range=1.0)
    out = step(
        clipped, clipped.respaced(d1), gaussian_eps(d1), x, 1, state={"d": [x], "x": x_prev + 50, "order": 1, "raw": x}
    )
    assert out.abs().max() <= 1.0 and out.max() == 1.0


def test_the_churn_plan_raises_each_level_by_gamma_between_its_bounds() -> None:
    """EDM Alg. 2's churn: gamma = min(churn / levels, sqrt(2) - 1); each level s = sigma/alpha with churn_min <= s <=
    churn_max (both ends included) moves to the timestep nearest s (1 + gamma) in log s when that is above it; with no
    level raised the churn process is t = T alone."""
    from genzoo.diffusion import solvers

    d = process(T=200)
    abar = d.tables["abar"]
    log_s = 0.5 * (np.log1p(-abar) - np.log(abar))
    probe = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=2.0, clip=False))
    grid = probe.respaced(d).timestep_map.tolist()
    lo, hi = math.exp(log_s[grid[3]]), math.exp(log_s[grid[7]])  # bounds exactly at two levels: both kept
    sampler = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=2.0, churn_min=lo, churn_max=hi, clip=False))
    where, churned = sampler.churn_plan(d)
    gamma = min(2.0 / (len(grid) - 1), math.sqrt(2) - 1)
    want = {}
    for i, g in enumerate(grid[1:], start=1):
        if lo <= math.exp(log_s[g]) <= hi:
            c = int(np.abs(log_s - (log_s[g] + math.log1p(gamma))).argmin())
            if c > g:
                want[i] = c
    assert sorted(want) == [3, 4, 5, 6, 7]
    assert {i: int(churned.timestep_map[j]) for i, j in where.items()} == want
    none = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=2.0, churn_min=1e6, clip=False)).churn_plan(d)
    assert none[0] == {} and none[1].timestep_map.tolist() == [199]


def test_dpm_solver_3m_second_step_and_no_noise_for_the_ode() -> None:
    """The second step (one earlier D) is second order: + alpha' phi2 (D0 - D1) / r0; the ODE draws no noise."""
    from genzoo.diffusion import solvers

    sampler = solvers.DPMSolverPlusPlus3M(solvers.MultistepConfig(steps=12, grid="uniform", clip=False))
    proc, model, alpha, sigma, lam = log_snr(sampler)
    i, x, d1_ = 6, randn(8, 3, seed=1), randn(8, 3, seed=5)
    g = gen(9)
    out = step(sampler, proc, model, x, i, generator=g, state={"d": [d1_], "h": [lam[i] - lam[i + 1]]})
    assert torch.equal(g.get_state(), gen(9).get_state())
    eps = model(x, torch.full((8,), int(proc.timestep_map[i])), None)
    d0 = (x - sigma[i] * eps) / alpha[i]
    h = lam[i - 1] - lam[i]
    r0 = (lam[i] - lam[i + 1]) / h
    phi2 = math.expm1(-h) / h + 1
    want = sigma[i - 1] / sigma[i] * x - alpha[i - 1] * math.expm1(-h) * d0 + alpha[i - 1] * phi2 / r0 * (d0 - d1_)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_solver_grids_exactly() -> None:
    """quadratic: t_k = round((k / (n - 1))^2 (T - 1)) (DDIM's "quad"); a grid of every timestep is every timestep;
    an unknown grid is refused with the list of grids."""
    from genzoo.diffusion.schedules import solver_grid

    abar = np.cumprod(1 - get_named_beta_schedule("linear", 1000))
    assert solver_grid(abar, 5, "quadratic") == [0, 62, 250, 562, 999]
    small = np.cumprod(1 - get_named_beta_schedule("linear", 25))
    for grid in ("quadratic", "log-snr", "karras"):
        assert solver_grid(small, 25, grid) == list(range(25))
    message = r"^unknown sampler grid 'cubic'; use one of uniform, quadratic, log-snr, karras$"
    with pytest.raises(ValueError, match=message):
        solver_grid(abar, 5, "cubic")


def test_ddim_stride_one_and_churn_one() -> None:
    """ "ddimT" is stride 1, every timestep; churn 1 churns (only churn 0 is Alg. 1 without a plan)."""
    from genzoo.diffusion import solvers

    assert space_timesteps(10, "ddim10") == set(range(10))
    d = process(T=200)
    state = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=1.0, clip=False)).start(d, gaussian_eps(d))
    assert state["churn_at"] and set(state) == {"churn_at", "churn_proc", "churn_net"}
    assert solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, clip=False)).start(d, gaussian_eps(d)) == {}


# ------------------------------------------------------------------ part three: what no selected test called
# (the first `make mutation` run found 219 mutants in these functions with no covering test)


def test_named_beta_schedules_in_closed_form() -> None:
    """linear: 1e-4..0.02 evenly at T = 1000, both ends times 1000 / T otherwise (DDPM Sec. 4); cosine: the product of
    1 - b_1..b_t is f(t) / f(0), f(t) = cos^2((t / T + 0.008) / 1.008 pi / 2) (Improved DDPM Eq. 17), and the last
    beta, where f(T) = 0, is clipped to 0.999."""
    lin = get_named_beta_schedule("linear", 1000)
    assert lin.dtype == np.float64 and lin.shape == (1000,) and lin[0] == 1e-4 and lin[-1] == 0.02
    np.testing.assert_allclose(np.diff(lin), (0.02 - 1e-4) / 999, rtol=1e-9)
    lin = get_named_beta_schedule("linear", 40)  # scaled by 25
    assert (
        lin.shape == (40,) and lin[0] == pytest.approx(2.5e-3, rel=1e-15) and lin[-1] == pytest.approx(0.5, rel=1e-15)
    )
    T = 20
    cos = get_named_beta_schedule("cosine", T)

    def f(t: int) -> float:
        return math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2

    assert cos.dtype == np.float64 and cos.shape == (T,)
    abar = np.cumprod(1 - cos)
    for t in range(1, T):
        assert abar[t - 1] == pytest.approx(f(t) / f(0), rel=1e-13), t
    assert cos[-1] == 0.999 and cos[:-1].max() < 0.8
    with pytest.raises(ValueError, match=r"^unknown beta schedule 'quad'; use 'linear' or 'cosine'$"):
        get_named_beta_schedule("quad", 10)


def test_spaced_grids_are_diffusers_timestep_spacings() -> None:
    """leading: k (T // n) + offset; trailing: round(T - k T / n) - 1; linspace: round(linspace(0, T - 1, n)); even:
    space_timesteps. A grid that diffusers' t -> t - T // n step does not walk is refused, each with its reason."""
    from genzoo.diffusion.schedules import spaced_grid

    assert spaced_grid(1000, 10, "leading") == set(range(0, 1000, 100))
    assert spaced_grid(1000, 10, "leading", 1) == set(range(1, 1000, 100))
    assert spaced_grid(1000, 10, "trailing") == set(range(99, 1000, 100))
    assert spaced_grid(5, 5, "linspace") == {0, 1, 2, 3, 4} and spaced_grid(2, 2, "linspace") == {0, 1}
    assert spaced_grid(4, 4, "trailing") == {0, 1, 2, 3}  # a stride of one: the last point is t = 1
    assert spaced_grid(100, 7, "even") == space_timesteps(100, 7)
    with pytest.raises(ValueError, match=r"^unknown timestep spacing 'cubic'; use one of even, leading, trailing, "):
        spaced_grid(10, 2, "cubic")
    fewer = [
        ((10, 20, "leading", 0), r"leading spacing of 20 steps over 10 timesteps gives \[0, 0, 0\]\.\.\.; use fewer"),
        ((10, 5, "leading", -1), r"leading spacing of 5 steps over 10 timesteps gives \[-1, 1, 3\]\.\.\.; use fewer"),
        ((10, 5, "leading", 2), r"leading spacing of 5 steps over 10 timesteps gives \[2, 4, 6\]\.\.\.; use fewer"),
    ]
    uneven = [
        ((11, 5, "leading", 2), r"leading spacing of 5 steps over 11 timesteps is not evenly 2 apart"),
        ((1000, 10, "linspace", 0), r"linspace spacing of 10 steps over 1000 timesteps is not evenly 100 apart"),
        ((10, 4, "trailing", 0), r"trailing spacing of 4 steps over 10 timesteps is not evenly 2 apart"),
    ]
    for args, message in fewer:
        with pytest.raises(ValueError, match="^" + message + " steps$"):
            spaced_grid(*args)
    for args, message in uneven:
        with pytest.raises(ValueError, match="^" + message + r", so diffusers' step \(t -> t - T // steps\) is not a "):
            spaced_grid(*args)
    with pytest.raises(ValueError, match=r"is not a respaced process; use 'leading' spacing or other steps$"):
        spaced_grid(1000, 10, "linspace")


def test_betas_with_float32_abar_give_diffusers_float32_tables() -> None:
    """The float64 cumulative product of 1 - b is torch.cumprod of float32 alphas (diffusers' abar): linear betas
    from torch.linspace in float32 (scaled by 1000 / T), the others rounded from float64; explicit betas instead of
    the name."""
    from genzoo.diffusion.schedules import betas_with_float32_abar

    cases = [
        ("linear", 1000, None, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)),
        ("linear", 250, None, torch.linspace(4e-4, 0.08, 250, dtype=torch.float32)),
        ("cosine", 1000, None, torch.as_tensor(get_named_beta_schedule("cosine", 1000)).float()),
        ("cosine", 3, [0.1, 0.25, 0.5], torch.tensor([0.1, 0.25, 0.5])),
    ]
    for name, T, explicit, b32 in cases:
        b = betas_with_float32_abar(name, T, explicit)
        abar32 = torch.cumprod(1 - b32, dim=0)
        assert b.dtype == np.float64 and b.shape == (T,)
        np.testing.assert_allclose(np.cumprod(1 - b), abar32.double().numpy(), rtol=1e-12, atol=0)
        assert b[0] == 1 - float(abar32[0])
        f64 = np.asarray(explicit) if explicit else get_named_beta_schedule(name, T)
        assert np.abs(np.cumprod(1 - f64) / abar32.double().numpy() - 1).max() > 1e-8  # float32 is not float64
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # float32 whatever torch's default dtype
    try:
        assert np.array_equal(betas_with_float32_abar("linear", 1000), betas_with_float32_abar("linear", 1000, None))
        b = betas_with_float32_abar("linear", 1000)
    finally:
        torch.set_default_dtype(default)
    assert np.array_equal(b, betas_with_float32_abar("linear", 1000))


def test_create_timestep_sampler_by_name() -> None:
    from genzoo.diffusion.gaussian_diffusion import LossAwareSampler, UniformSampler, create_timestep_sampler

    d = process(schedule="cosine", T=7)
    uniform, aware = create_timestep_sampler("uniform", d), create_timestep_sampler("loss-aware", d)
    assert type(uniform) is UniformSampler and uniform.num_timesteps == 7
    assert type(aware) is LossAwareSampler and aware.num_timesteps == 7 and aware.history.shape == (7, 10)
    with pytest.raises(ValueError, match=r"^unknown timestep sampler 'importance'; use 'uniform' or 'loss-aware'$"):
        create_timestep_sampler("importance", d)


def mixture_log_density(gmm, x: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """log q(x_t) = log sum_k w_k N(x; sqrt(abar) mu_k, abar S_k + (1 - abar) I), per sample, by torch.distributions."""
    from torch.distributions import MultivariateNormal

    a = abar.to(F64).view(-1, 1, 1, 1)
    comps = MultivariateNormal(
        a[..., 0].sqrt() * gmm.means, covariance_matrix=a * gmm.covs + (1 - a) * torch.eye(gmm.means.shape[1])
    )
    return torch.logsumexp(torch.log(gmm.weights) + comps.log_prob(x.to(F64)[:, None, :]), dim=-1)


def test_mixture_score_and_log_joint_are_those_of_the_noised_density() -> None:
    """``score`` is the autograd gradient of log q(x_t) (torch.distributions), per-sample abar; ``log_joint`` sums
    to log q(x_t); the posterior is its softmax."""
    from genzoo.diffusion.gmm import small_variance_mixture

    gmm = small_variance_mixture()
    x, abar = randn(4, 2, seed=5), torch.tensor([0.999, 0.7, 0.2, 0.01], dtype=F64)
    xg = x.clone().requires_grad_(True)
    want = torch.autograd.grad(mixture_log_density(gmm, xg, abar).sum(), xg)[0]
    torch.testing.assert_close(gmm.score(x, abar), want, **EXACT)
    logp, score_k = gmm.log_joint(x, abar)
    torch.testing.assert_close(torch.logsumexp(logp, -1), mixture_log_density(gmm, x, abar), **EXACT)
    torch.testing.assert_close(gmm.posterior(x, abar), logp.softmax(-1), **EXACT)
    a = abar.view(-1, 1, 1)
    cov = a[..., None] * gmm.covs + (1 - a[..., None]) * torch.eye(2, dtype=F64)  # (B, K, 2, 2)
    diff = x[:, None, :] - a.sqrt() * gmm.means
    torch.testing.assert_close(score_k, -torch.linalg.solve(cov, diff.unsqueeze(-1)).squeeze(-1), **EXACT)


def test_the_exact_denoiser_and_classifier_of_a_mixture() -> None:
    """E[eps | x_t] = -sqrt(1 - abar) grad log q(x_t); with a class y, component y's; with ``drop``, the mixture's;
    ``exact_classifier`` is log p(k | x_t) at the process's abar_t, in the input's dtype."""
    from genzoo.diffusion.gmm import exact_classifier, exact_eps_model, small_variance_mixture

    gmm, d = small_variance_mixture(), process(schedule="cosine", T=50)
    x, t = randn(3, 2, seed=6), torch.tensor([0, 20, 49])
    abar = torch.as_tensor(d.tables["abar"])[t]
    model = exact_eps_model(gmm, d)
    torch.testing.assert_close(model(x, t), -(1 - abar).sqrt()[:, None] * gmm.score(x, abar), **EXACT)
    y, drop = torch.tensor([2, 0, 1]), torch.tensor([False, True, False])
    _, score_k = gmm.log_joint(x, abar)
    want = torch.where(drop[:, None], gmm.score(x, abar), score_k[torch.arange(3), y])
    torch.testing.assert_close(model(x, t, {"y": y, "drop": drop}), -(1 - abar).sqrt()[:, None] * want, **EXACT)
    torch.testing.assert_close(model(x, t, {"y": y}), -(1 - abar).sqrt()[:, None] * score_k[torch.arange(3), y])
    assert model(x.float(), t).dtype == torch.float32
    logp, _ = gmm.log_joint(x, abar)
    classifier = exact_classifier(gmm, d)
    torch.testing.assert_close(classifier(x, t), logp.log_softmax(-1), **EXACT)
    out = classifier(x.float(), t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), logp.log_softmax(-1), rtol=0, atol=1e-5)


def test_noised_draws_a_uniform_original_t_and_q_samples_with_the_global_rng() -> None:
    """t uniform over the process's indices, returned as ORIGINAL indices (a respaced process), x_t = sqrt(abar) x0 +
    sqrt(1 - abar) eps with eps from the global RNG; both on the input's device."""
    from genzoo.diffusion.guidance import noised

    r = process(schedule="cosine", T=40).respace(range(0, 40, 4))
    x0 = randn(6, 3, seed=7)
    torch.manual_seed(11)
    x_t, t = noised(x0, r)
    torch.manual_seed(11)
    i = torch.randint(0, 10, (6,))
    eps = torch.randn(6, 3, dtype=F64)
    abar = torch.as_tensor(r.tables["abar"])[i][:, None]
    assert torch.equal(t, 4 * i)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * eps, **EXACT)
    torch.manual_seed(0)
    assert set(noised(torch.zeros(500, 1, dtype=F64), r)[1].tolist()) == set(range(0, 40, 4))
    x_t, t = noised(torch.zeros(2, 3, device=META), r)
    assert x_t.device == META and t.device == META


def test_the_noisy_classifier_trains_by_cross_entropy_on_noised_inputs() -> None:
    from genzoo.diffusion.guidance import ClassifierGuidance, noised

    d = process(schedule="cosine", T=30)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [0.3, 0.2, 0.1], [-1.0, 0.0, 3.0]], dtype=F64)
    calls = []
    guidance = ClassifierGuidance(lambda x, t: calls.append((x, t)) or logits, scale=1.0)
    x0, y = randn(4, 3, seed=8), torch.tensor([0, 1, 0, 1])
    torch.manual_seed(3)
    out = guidance.training_losses(x0, {"y": y}, d)
    torch.manual_seed(3)
    x_t, t = noised(x0, d)
    assert len(calls) == 1 and torch.equal(calls[0][0], x_t) and torch.equal(calls[0][1], t)
    ce = [math.log(sum(math.exp(v) for v in row)) - row[k] for row, k in zip(logits.tolist(), y.tolist())]
    assert out["loss"].item() == pytest.approx(sum(ce) / 4, rel=1e-14)
    assert out["accuracy"].item() == 0.75  # argmax 0, 1, 0, 2
    message = r"^training the noisy classifier needs labels: set the pipeline's condition to 'class'$"
    for cond in (None, {}, {"tokens": y}):
        with pytest.raises(ValueError, match=message):
            guidance.training_losses(x0, cond, d)


def test_noised_clip_losses_noise_the_images_only_for_a_noised_clip(monkeypatch) -> None:
    """GLIDE's noised CLIP trains on (x_t, t) of the decoder's process; a plain CLIP on (x0, None)."""
    from types import SimpleNamespace

    import genzoo.text.clip
    from genzoo.diffusion.guidance import noised, noised_clip_losses

    seen = []
    monkeypatch.setattr(genzoo.text.clip, "clip_losses", lambda *args: seen.append(args) or {"loss": args[1].sum()})
    d, x0, cond = process(schedule="cosine", T=30), randn(5, 3, seed=9), {"tokens": torch.zeros(5, 2)}
    clip = SimpleNamespace(noised=True)
    torch.manual_seed(4)
    out = noised_clip_losses(clip, x0, cond, d)
    torch.manual_seed(4)
    x_t, t = noised(x0, d)
    assert seen[0][0] is clip and torch.equal(seen[0][1], x_t) and seen[0][2] is cond and torch.equal(seen[0][3], t)
    assert out["loss"] == x_t.sum()
    clip.noised = False
    noised_clip_losses(clip, x0, cond, d)
    assert seen[1][0] is clip and seen[1][1] is x0 and seen[1][2] is cond and seen[1][3] is None


def test_classifier_guidance_builds_its_classifier_network() -> None:
    from types import SimpleNamespace

    from torch import nn

    from genzoo.diffusion.guidance import ClassifierGuidanceConfig, make_classifier_guidance

    net, built = nn.Linear(1, 1), []

    class Registry:
        def build(self, kind, spec, *, data, where):
            built.append((kind, spec, data, where))
            return net

    cfg = ClassifierGuidanceConfig(scale=2.5, classifier={"type": "noisy-classifier", "model_channels": 8})
    g = make_classifier_guidance(cfg, SimpleNamespace(registry=Registry(), data="digits"))
    spec = {"type": "noisy-classifier", "model_channels": 8}
    assert built == [("network", spec, "digits", "guidance 'classifier': classifier: ")] and type(built[0][1]) is dict
    assert g.classifier is net and g.scale == 2.5 and g.needs_condition == frozenset({"y"})


def test_a_sampler_keeps_one_respaced_process_per_process_and_passes_its_grid_settings() -> None:
    """Alternating two processes reuses each one's respaced process; the karras grid takes rho and sigma_max."""
    from genzoo.diffusion.schedules import solver_grid

    sampler = DDIMSampler(DDIMConfig(steps=10))
    d1, d2 = process(T=100, schedule="cosine"), process(T=100, schedule="cosine")
    r1, r2 = sampler.respaced(d1), sampler.respaced(d2)
    assert r1 is not r2 and sampler.respaced(d1) is r1 and sampler.respaced(d2) is r2
    d = process(T=1000, schedule="cosine")
    karras = DDIMSampler(DDIMConfig(steps=10, grid="karras", rho=3.0, sigma_max=5.0))
    want = solver_grid(d.tables["abar"], 10, "karras", 3.0, 5.0)
    assert karras.respaced(d).timestep_map.tolist() == want
    assert want != solver_grid(d.tables["abar"], 10, "karras", 3.0, 80.0) != solver_grid(d.tables["abar"], 10, "karras")


def test_ddim_steps_with_the_models_own_eps_when_asked() -> None:
    """clipped_eps False (diffusers' default): x' = sqrt(abar') clamp(x0_hat) + sqrt(1 - abar') eps_model at eta 0;
    True: the eps recomputed from the clamped x0_hat."""
    d = process(T=100, clip_range=1.0)
    x = 3 * randn(6, 3, seed=12)

    def model(x, t, cond):  # eps = 0.1 x: x0_hat = 0.9-ish x / sqrt(abar), far outside [-1, 1], so it is clamped
        return 0.1 * x

    for clipped in (False, True):
        sampler = DDIMSampler(DDIMConfig(steps=10, clipped_eps=clipped))
        proc = sampler.respaced(d)
        out = step(sampler, proc, model, x, 5)
        abar, prev, _, _ = coefficients(proc, 5)
        eps = 0.1 * x
        x0 = ((x - math.sqrt(1 - abar) * eps) / math.sqrt(abar)).clamp(-1, 1)
        assert (x0.abs() == 1).any()
        if clipped:
            eps = (x - math.sqrt(abar) * x0) / math.sqrt(1 - abar)
        torch.testing.assert_close(out, math.sqrt(prev) * x0 + math.sqrt(1 - prev) * eps, **EXACT)


def test_edm_churn_noise_is_drawn_in_the_state_dtype() -> None:
    """The churned point sqrt(abar_c / abar) x + churn_noise sqrt(1 - abar_c / abar) z, z a float64 draw of the
    generator (a float32 draw differs at 1e-8)."""
    from genzoo.diffusion import solvers

    d = process(T=200)
    sampler = solvers.EDMHeun(solvers.EDMHeunConfig(steps=10, churn=2.0, churn_noise=1.007, clip=False))
    proc, (where, churned) = sampler.respaced(d), sampler.churn_plan(d)
    i, j = next(iter(where.items()))
    seen = []

    def net(x, t, cond):
        seen.append(x.clone())
        return gaussian_eps(d)(x, t, cond)

    x = randn(16, 3, seed=13)
    state = {"churn_at": where, "churn_proc": churned, "churn_net": net}
    step(sampler, proc, net, x, i, generator=gen(14), state=state)
    ratio = float(churned.tables["abar"][j] / proc.tables["abar"][i])
    z = torch.randn(16, 3, generator=gen(14), dtype=F64)
    want = math.sqrt(ratio) * x + 1.007 * math.sqrt(1 - ratio) * z
    assert seen[0].dtype == F64
    torch.testing.assert_close(seen[0], want, **EXACT)


def test_solver_grids_at_their_edge_cases() -> None:
    """A noisiest level exactly at sigma_max is not capped (capping is for t = T noisier than sigma_max); targets
    crowded at t = T are moved down one by one, from the end to the first point after t = 1."""
    from genzoo.diffusion.schedules import solver_grid

    log_sigma = np.linspace(-4, math.log(2.0), 20)
    abar = 1 / (1 + np.exp(2 * log_sigma))
    abar[-1] = 0.2  # sigma_T = sqrt(0.8 / 0.2) = 2, exactly log 2 in log sigma
    assert 0.5 * (math.log1p(-0.2) - math.log(0.2)) == math.log(2.0)
    assert solver_grid(abar, 4, "log-snr", sigma_max=2.0) == solver_grid(abar, 4, "log-snr", sigma_max=None)
    assert solver_grid(abar, 4, "log-snr", sigma_max=2.0) == [0, 6, 13, 19]
    assert solver_grid(abar, 4, "log-snr", sigma_max=1.999) == [0, 9, 18, 19]  # capped: t = T, then from sigma_max
    crowded = 1 / (1 + np.exp(2 * np.array([-10, -9.9, -9.8, -9.5, -9.2, -9.0, 10.0])))
    assert solver_grid(crowded, 4, "log-snr", sigma_max=None) == [0, 4, 5, 6]  # targets at 0, 5, 6, 6
