"""Time grids and the higher-order solvers (genzoo/diffusion/solvers.py) against closed forms.

Convergence orders are measured against the exact probability-flow map of Gaussian data, not against a solver:
for data N(mu, s^2), x_t ~ N(alpha_t mu, alpha_t^2 s^2 + sigma_t^2) and the flow keeps the standardised
z = (x_t - alpha_t mu) / sqrt(alpha_t^2 s^2 + sigma_t^2), so it maps x_T to
alpha_e mu + sqrt(alpha_e^2 s^2 + sigma_e^2) z at any level e; the solvers' last step, x0_hat at their last
evaluated level e, then gives
D = mu + alpha_e s^2 z / sqrt(alpha_e^2 s^2 + sigma_e^2) (the exact denoiser of Gaussian data). The process for
these tests has lambda = log(alpha / sigma) linear in the index (5 at t = 1 to -5 at t = T, T = 1601), so the
uniform grid of N points (N - 1 dividing 1600) is exactly uniform in lambda and halving the step halves h exactly;
on the integer grids of a T = 1000 schedule the rounding near t = 1 makes the steps uneven and the fitted order
noisy. A mutated coefficient in each solver must fail the same check.

Mixture tolerances (``MIXTURE_CASES``): on the separated mixture, test_samplers_closed_form's check with the
largest mean or covariance entry error measured with 40000 samples as the allowance; on the small-variance mixture,
the errors measured in the same configuration (20000 samples, seed 3), rounded up, plus the sampling error of 20000
exact draws (the largest over six seeds, rounded up: weight 0.008, mean 0.035, covariance 0.04).
docs/diffusion.md has the same solvers with 100000 samples against ancestral DDPM-1000.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from test_samplers_closed_form import (
    GMM,
    OVERLAP,
    assert_cfg_is_classifier_guidance,
    check_gaussian,
    check_mixture,
    draw,
    spy_on,
    unconditional,
)
from tiny import assert_ends_at_dirac, gaussian_diffusion, lambda_linear

from genzoo.diffusion import (
    ClassifierFreeGuidance,
    ClassifierGuidance,
    GaussianDiffusion,
    ModelVarType,
    get_named_beta_schedule,
    solvers,
)
from genzoo.diffusion.gmm import GaussianMixture, exact_eps_model, small_variance_mixture
from genzoo.diffusion.guidance import CFGConfig
from genzoo.diffusion.samplers import DDIMConfig, DDIMSampler, DPMSolverPlusPlus2M, SamplerConfig
from genzoo.diffusion.schedules import GRIDS, solver_grid, space_timesteps
from genzoo.plugins import default_registry

F64 = torch.float64
NEW = ("edm-heun", "dpmpp-3m", "dpmpp-3m-sde", "unipc")
SMALL = small_variance_mixture()
ALLOWANCE = {"weight": 0.008, "mean": 0.035, "cov": 0.04}


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name: str, **cfg):
    return default_registry().build("sampler", {"type": name, "clip": False, **cfg})


def linear_abar(schedule: str = "linear", timesteps: int = 1000) -> np.ndarray:
    return np.cumprod(1 - get_named_beta_schedule(schedule, timesteps))


# ------------------------------------------------------------------ grids


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_grids_have_exactly_the_points_asked_for_from_t_equals_T_to_1(grid: str, schedule: str) -> None:
    abar = linear_abar(schedule)
    for points in (2, 3, 10, 21, 100, 500, 1000):
        kept = solver_grid(abar, points, grid)
        assert len(kept) == points and kept[0] == 0 and kept[-1] == 999, (points, kept[:5])
        assert all(b > a for a, b in zip(kept, kept[1:]))
    with pytest.raises(ValueError, match="impossible"):
        solver_grid(abar, 1001, grid)


def test_karras_and_log_snr_grids_keep_the_timestep_nearest_each_target() -> None:
    """EDM Eq. 5 with rho = 7 between t = 1's sigma and sigma_max = 80 (the chain still starts at t = T), and an even
    lambda grid: every point is the integer timestep nearest its target in log sigma (no collisions at 20 points)."""
    abar = linear_abar()
    log_s = 0.5 * (np.log1p(-abar) - np.log(abar))
    s_lo, s_hi = math.exp(log_s[0] / 7), 80 ** (1 / 7)
    karras = [7 * math.log(s_lo + k / 18 * (s_hi - s_lo)) for k in range(19)]
    snr = [log_s[0] + k / 18 * (math.log(80) - log_s[0]) for k in range(19)]
    for grid, targets in (("karras", karras), ("log-snr", snr)):
        kept = solver_grid(abar, 20, grid)
        assert kept[:-1] == [int(np.abs(log_s - v).argmin()) for v in targets] and kept[-1] == 999, grid
    uncapped = solver_grid(abar, 20, "karras", sigma_max=None)  # sigma_T = 157 is the top target
    assert uncapped[-2] == int(np.abs(log_s - 7 * math.log(s_lo + 18 / 19 * (math.exp(log_s[-1] / 7) - s_lo))).argmin())


def test_uniform_grid_is_the_even_spacing_of_before() -> None:
    """The default keeps today's grid (space_timesteps), so every existing sampler runs as before."""
    assert SamplerConfig().grid == "uniform" and SamplerConfig().spacing == "even"
    for n in (2, 10, 21, 250):
        assert solver_grid(linear_abar(), n, "uniform") == sorted(space_timesteps(1000, n))
    d = gaussian_diffusion()
    assert DPMSolverPlusPlus2M(SamplerConfig(steps=20)).respaced(d).timestep_map.tolist() == sorted(
        space_timesteps(1000, 21)
    )


def test_grid_refuses_diffusers_spacings_and_section_strings() -> None:
    with pytest.raises(
        ValidationError, match="grid 'karras' picks its own timesteps, so spacing must be 'even'.*'leading'"
    ):
        SamplerConfig(grid="karras", spacing="leading")
    with pytest.raises(ValidationError, match="grid 'log-snr' takes an integer number of steps, not steps='10,5'"):
        SamplerConfig(grid="log-snr", steps="10,5")
    assert SamplerConfig(grid="quadratic", steps="12").steps == "12"
    assert SamplerConfig(spacing="leading").grid == "uniform"  # spacing stays the uniform grid's option


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("name", NEW + ("dpm-solver++", "ddim"))
def test_samplers_evaluate_nfe_times_at_the_grid_original_timesteps(name: str, grid: str) -> None:
    d, seen = diffusion_linear(), []
    sampler = build(name, steps=6, grid=grid)
    kept = sampler.respaced(d).timestep_map.tolist()
    sampler.sample(
        d,
        spy_on(exact_eps_model(GMM, d), seen),
        (3, 2),
        noise=torch.randn(3, 2, dtype=F64),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(seen) == sampler.nfe() and all(len(set(s)) == 1 for s in seen)
    assert kept == solver_grid(d.tables["abar"], len(kept), grid)
    evaluated = kept[sampler.last_index :][::-1]
    if name == "edm-heun":  # each level, then the corrector at the next one; the last level alone
        assert [s[0] for s in seen] == [v for pair in zip(evaluated, evaluated[1:]) for v in pair] + [evaluated[-1]]
        assert sampler.nfe() == 11
    else:
        assert [s[0] for s in seen] == evaluated and sampler.nfe() == 6


def diffusion_linear() -> GaussianDiffusion:
    return gaussian_diffusion(clip_range=None)


# ------------------------------------------------------------------ convergence against the exact flow of Gaussian data


MU, S = 0.5, 0.2
GAUSS = GaussianMixture(
    weights=torch.tensor([1.0], dtype=F64),
    means=torch.tensor([[MU]], dtype=F64),
    covs=torch.tensor([[[S * S]]], dtype=F64),
)


PROC = lambda_linear()
X_T = torch.linspace(-3, 3, 61, dtype=F64)[:, None]


def exact_flow(sampler) -> torch.Tensor:
    """The exact flow from x_T to the sampler's last evaluated level e, then the exact denoiser there."""
    abar = PROC.tables["abar"]
    e = int(sampler.respaced(PROC).timestep_map[sampler.last_index])
    z = (X_T - math.sqrt(abar[-1]) * MU) / math.sqrt(abar[-1] * S * S + 1 - abar[-1])
    return MU + math.sqrt(abar[e]) * S * S / math.sqrt(abar[e] * S * S + 1 - abar[e]) * z


def flow_error(sampler) -> float:
    """Mean |x0 - exact| over x_T in [-3, 3], in units of the data's standard deviation."""
    x = sampler.sample(PROC, exact_eps_model(GAUSS, PROC), tuple(X_T.shape), noise=X_T)
    return (x - exact_flow(sampler)).abs().mean().item() / S


def orders(make, steps: tuple[int, ...]) -> list[float]:
    errors = [flow_error(make(n)) for n in steps]
    return [math.log2(a / b) for a, b in zip(errors, errors[1:])]


class HeunFirstOrder(solvers.EDMHeun):
    def weights(self):
        return 0.6, 0.4  # the trapezoid's weights must be equal


class ThreeMAsReferenceCode(solvers.DPMSolverPlusPlus3M):
    def phis(self, h):
        phi2, phi3 = super().phis(h)
        return phi2, phi3 / 2  # d2 without its factor 2: the DPM-Solver repository's, diffusers' and k-diffusion's 3M


class UniPCWrongCorrector(solvers.UniPC):
    def coefficients(self, h, rks, corrector):
        rho = super().coefficients(h, rks, corrector)
        return rho * 1.1 if corrector else rho


class UniPCWrongPredictor(solvers.UniPC):
    def coefficients(self, h, rks, corrector):
        rho = super().coefficients(h, rks, corrector)
        return rho if corrector else rho * 1.2


def uniform(cls, config, **kw):
    return lambda n: cls(config(steps=n, grid="uniform", clip=False, **kw))


# (id, make(steps), steps, lowest accepted order, highest). Measured (21 -> 41 -> 81 steps unless noted): DDIM 0.96,
# 0.98; DPM-Solver++(2M) 1.77, 1.93; EDM Heun (11 -> 21 -> 41 levels) 2.04, 2.02; DPM-Solver++(3M) 3.85, 3.88 (order 3
# at least; the Gaussian's flow is smooth enough for more); UniPC-2 with UniC (order 3) 2.73, 2.90; UniPC-3 with UniC
# (order 4, not reached at these steps) 2.97, 3.05.
ORDER_CASES = [
    ("ddim", uniform(DDIMSampler, DDIMConfig), (21, 41, 81), 0.8, 1.2),
    ("dpm-solver++", uniform(DPMSolverPlusPlus2M, SamplerConfig), (21, 41, 81), 1.6, 2.3),
    ("edm-heun", uniform(solvers.EDMHeun, solvers.EDMHeunConfig), (11, 21, 41), 1.8, 2.5),
    ("dpmpp-3m", uniform(solvers.DPMSolverPlusPlus3M, solvers.MultistepConfig), (21, 41, 81), 2.8, 4.5),
    ("unipc", uniform(solvers.UniPC, solvers.UniPCConfig), (21, 41, 81), 2.6, 3.5),
    ("unipc-order3", uniform(solvers.UniPC, solvers.UniPCConfig, order=3), (21, 41, 81), 2.9, 4.5),
]


@pytest.mark.parametrize(
    ("make", "steps", "low", "high"), [c[1:] for c in ORDER_CASES], ids=[c[0] for c in ORDER_CASES]
)
def test_solvers_converge_at_their_order_to_the_exact_flow(make, steps, low: float, high: float) -> None:
    found = orders(make, steps)
    assert all(low < p < high for p in found), found


# (id, mutant, its config's fields, steps, the correct solver's lowest accepted order): each mutant subclasses the
# solver it breaks, the correct one. Measured orders of the mutants: Heun 0.6/0.4 (41 -> 81 -> 161 levels) 0.34,
# 0.76 (first order; its error changes sign near 21 levels); 3M with the reference code's d2 2.40, 2.12; UniPC-2
# with rho_c x 1.1 1.39, 1.13; UniPC-3 with rho_p x 1.2 2.16, 1.98.
MUTANT_CASES = [
    ("edm-heun-weights", HeunFirstOrder, solvers.EDMHeunConfig, {}, (41, 81, 161), 1.8),
    ("dpmpp-3m-reference-d2", ThreeMAsReferenceCode, solvers.MultistepConfig, {}, (21, 41, 81), 2.8),
    ("unipc-corrector", UniPCWrongCorrector, solvers.UniPCConfig, {}, (21, 41, 81), 2.6),
    ("unipc-order3-predictor", UniPCWrongPredictor, solvers.UniPCConfig, {"order": 3}, (21, 41, 81), 2.9),
]


@pytest.mark.parametrize(
    ("cls", "config", "kw", "steps", "low"), [c[1:] for c in MUTANT_CASES], ids=[c[0] for c in MUTANT_CASES]
)
def test_a_wrong_coefficient_fails_the_order_check(cls, config, kw: dict, steps, low: float) -> None:
    mutant, correct = uniform(cls, config, **kw), uniform(cls.__base__, config, **kw)
    assert not all(p > low for p in orders(mutant, steps))
    assert flow_error(mutant(steps[-1])) > 3 * flow_error(correct(steps[-1]))


def sde_moments(sampler, probe_randn) -> tuple[float, float]:
    """(mean - mu, variance / exact - 1) of the SDE sampler's output for Gaussian data, exactly: the sampler is affine
    in x_T and its noises, so with x_T and each noise draw set to a unit vector in turn (one batch row each) its
    coefficients are read off, and Var = the sum of their squares (x_T and the draws are independent N(0, 1))."""
    rows = 2 + sampler.nfe() + 2
    x_t = torch.zeros(rows, 1, dtype=F64)
    x_t[1] = 1
    out = probe_randn(lambda: sampler.sample(PROC, exact_eps_model(GAUSS, PROC), (rows, 1), noise=x_t))[:, 0]
    coef = out[1:] - out[0]
    abar = PROC.tables["abar"][int(sampler.respaced(PROC).timestep_map[sampler.last_index])]
    exact = abar * S**4 / (abar * S * S + 1 - abar)  # Var D(x_e) for x_e ~ q(x_e)
    return out[0].item() - MU, (coef**2).sum().item() / exact - 1


@pytest.fixture
def probe_randn(monkeypatch):
    def run(fn):
        calls = []

        def unit(shape, x_like, *, generator=None, **kw):
            z = torch.zeros(shape, dtype=x_like.dtype)
            z[2 + len(calls)] = 1
            calls.append(1)
            return z

        monkeypatch.setattr(solvers, "randn", unit)
        out = fn()
        assert len(calls) > 0
        return out

    return run


class SDEWrongNoise(solvers.DPMSolverPlusPlus3MSDE):
    def noise_scale(self, sigma_next, h):
        return 1.05 * super().noise_scale(sigma_next, h)


def test_sde_variant_converges_weakly_and_a_wrong_noise_fails(probe_randn) -> None:
    """The output variance of DPM-Solver++(3M) SDE for Gaussian data, exactly: relative errors 5.6e-2, 8.7e-3, 1.9e-3
    at 21, 41, 81 steps (weak order 2.7, 2.2); with 5% too much noise at each step it stalls at 10%."""
    make = uniform(solvers.DPMSolverPlusPlus3MSDE, solvers.SDEConfig)
    found = [sde_moments(make(n), probe_randn) for n in (21, 41, 81)]
    assert all(abs(m) < 1e-5 for m, _ in found)  # the mean is exact (up to the prior's alpha_T mu)
    var = [abs(v) for _, v in found]
    assert var[-1] < 3e-3 and all(math.log2(a / b) > 1.8 for a, b in zip(var, var[1:])), var
    wrong = [abs(sde_moments(uniform(SDEWrongNoise, solvers.SDEConfig)(n), probe_randn)[1]) for n in (21, 41, 81)]
    assert wrong[-1] > 0.05, wrong


# ------------------------------------------------------------------ the closed-form mixtures

# (id, spec, separated-mixture bias as test_samplers_closed_form's, small-variance tolerances before the allowance)
MIXTURE_CASES = [
    ("edm-heun-18", {"type": "edm-heun", "steps": 18}, 0.07, {"weight": 0.006, "mean": 0.13, "cov": 0.09}),
    (
        "edm-heun-18-churn",
        {"type": "edm-heun", "steps": 18, "churn": 10},
        0.12,
        {"weight": 0.009, "mean": 0.22, "cov": 0.24},
    ),
    ("dpmpp-3m-20", {"type": "dpmpp-3m", "steps": 20}, 0.035, {"weight": 0.001, "mean": 0.022, "cov": 0.016}),
    ("dpmpp-3m-sde-20", {"type": "dpmpp-3m-sde", "steps": 20}, 0.12, {"weight": 0.003, "mean": 0.021, "cov": 0.052}),
    ("unipc-10", {"type": "unipc", "steps": 10}, 0.16, {"weight": 0.003, "mean": 0.044, "cov": 0.044}),
    ("unipc-20", {"type": "unipc", "steps": 20}, 0.04, {"weight": 0.001, "mean": 0.031, "cov": 0.021}),
    (
        "dpm-solver++-10-log-snr",
        {"type": "dpm-solver++", "steps": 10, "grid": "log-snr"},
        0.22,
        {"weight": 0.004, "mean": 0.057, "cov": 0.06},
    ),
]


@pytest.mark.parametrize(("spec", "bias", "small"), [c[1:] for c in MIXTURE_CASES], ids=[c[0] for c in MIXTURE_CASES])
def test_solvers_reproduce_the_mixtures(spec: dict, bias: float, small: dict) -> None:
    sampler = default_registry().build("sampler", {**spec, "clip": False})
    check_mixture(draw(sampler), bias=bias)
    errors = SMALL.errors(draw(sampler, SMALL, n=20000, seed=3))
    assert all(errors[m] < small[m] + ALLOWANCE[m] for m in ALLOWANCE), errors


def test_the_small_variance_check_can_fail() -> None:
    """DPM-Solver++(2M) at 20 steps on the uniform grid stops at t = 50 and denoises from there: covariances 27%
    short."""
    errors = SMALL.errors(draw(build("dpm-solver++", steps=20), SMALL, n=20000, seed=3))
    assert errors["cov"] > 0.2 and errors["mean"] > 0.2, errors


# ------------------------------------------------------------------ guidance: every sampler, every guidance


def diffusion_samplers() -> list[str]:
    registry = default_registry()
    return [e.name for e in registry.entries("sampler") if e.plugin == "diffusion"]


EPS_FORM = [n for n in diffusion_samplers() if n != "ddpm"]


@pytest.mark.parametrize("name", EPS_FORM)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cfg_with_exact_models_equals_classifier_guidance_for_every_eps_form_sampler(name: str, scale: float) -> None:
    """eps_u + s (eps_c - eps_u) = eps_u - sqrt(1 - abar) s grad log p(y | x_t): both guidances through the shared eps
    form give the same samples, churned Heun included (the same generator, the same draws)."""
    spec = {"steps": 8} if name != "edm-heun" else {"steps": 5, "churn": 5}
    assert_cfg_is_classifier_guidance(lambda: build(name, **spec), scale, n=200)


@pytest.mark.parametrize("name", NEW)
def test_guided_new_samplers_sample_the_conditional(name: str) -> None:
    """CFG at scale 1 with the exact conditional model is the component N(mu_y, S_y); classifier guidance at 3 moves
    mass toward y."""
    model = exact_eps_model(OVERLAP, diffusion_linear())
    sampler = build(name, steps=18 if name == "edm-heun" else 20)
    y = {"y": torch.ones(4000, dtype=torch.long)}
    x1 = draw(sampler, OVERLAP, cond=y, guidance=ClassifierFreeGuidance(CFGConfig(scale=1.0)), model=model)
    check_gaussian(x1, OVERLAP.means[1], OVERLAP.covs[1], 0.05)
    x3 = draw(
        sampler, OVERLAP, cond=y, guidance=ClassifierGuidance(model.classifier, scale=3.0), model=unconditional(model)
    )
    assert x3[:, 0].mean() > x1[:, 0].mean() + 0.1


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("var", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE])
def test_dirac_data_is_recovered_exactly(name: str, var: ModelVarType) -> None:
    """Every new sampler ends at a point's x0*, on every grid, with the clamp on, for images."""
    for grid in GRIDS:
        churn = {"churn": 3} if name == "edm-heun" else {}
        assert_ends_at_dirac(
            default_registry().build("sampler", {"type": name, "steps": 6, "grid": grid, **churn}), var
        )


def test_churn_evaluates_at_raised_timesteps_and_keeps_nfe() -> None:
    """EDM's churn raises each level s to the integer timestep nearest s (1 + gamma), gamma = min(S_churn / steps,
    sqrt(2) - 1), only within [churn_min, churn_max]; it costs no extra evaluation."""
    d, seen = diffusion_linear(), []
    sampler = build("edm-heun", steps=8, churn=4, churn_min=0.05, churn_max=10.0)
    sampler.sample(
        d,
        spy_on(exact_eps_model(GMM, d), seen),
        (2, 2),
        noise=torch.randn(2, 2, dtype=F64),
        generator=torch.Generator().manual_seed(0),
    )
    assert len(seen) == sampler.nfe() == 15
    kept = sampler.respaced(d).timestep_map.tolist()
    abar = d.tables["abar"]
    s = np.sqrt((1 - abar) / abar)
    firsts = [seen[0][0]] + [seen[k][0] for k in range(2, 15, 2)]  # each level's first evaluation
    gamma = min(4 / 8, math.sqrt(2) - 1)
    for level, t in zip(kept[1:][::-1], firsts):
        raised = int(np.abs(np.log(s) - np.log(s[level] * (1 + gamma))).argmin())
        want = raised if 0.05 <= s[level] <= 10.0 and raised > level else level
        assert t == want, (level, t, want)
    assert any(t not in kept for t in firsts)
