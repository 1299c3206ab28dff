"""Samplers and guidances against a Gaussian mixture whose exact denoiser is known in closed form.

Tolerances are sampling error plus a stated discretisation allowance. With n_k samples assigned to
component k, an estimated mean entry has standard error sqrt(S_ii / n_k) and a covariance entry
sqrt((S_ii S_jj + S_ij^2) / n_k); a weight has sqrt(w (1 - w) / N). Each check allows 4 standard
errors plus ``bias``, the sampler's own discretisation error: the largest mean or covariance error
measured with N = 40000 (where exact draws show 0.013), rounded up: 0.01 for DDPM-1000, 0.025 for
DPM-Solver++(2M)-20, 0.05 for DDIM-50 and respaced DDPM-100 (both first order). Components of the
main mixture are > 6 standard deviations apart, so assigning a sample to its most likely
component misassigns a negligible fraction and the weights test only sampling error.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import assert_ends_at_dirac, gaussian_diffusion

from genzoo.diffusion import (
    AncestralSampler,
    ClassifierFreeGuidance,
    ClassifierGuidance,
    DDIMSampler,
    DPMSolverPlusPlus2M,
    GaussianDiffusion,
    ModelVarType,
    space_timesteps,
)
from genzoo.diffusion.gmm import GaussianMixture, exact_classifier, exact_eps_model
from genzoo.diffusion.guidance import CFGConfig, DiffusionGuidance, GradientGuidance
from genzoo.diffusion.samplers import DDIMConfig, SamplerConfig
from genzoo.interfaces import with_null_condition

N = 4000
F64 = torch.float64
GMM = GaussianMixture(
    weights=torch.tensor([0.2, 0.3, 0.5], dtype=F64),
    means=torch.tensor([[-3.0, 0.0], [2.0, 2.5], [2.0, -2.5]], dtype=F64),
    covs=torch.tensor([[[0.3, 0.0], [0.0, 0.6]], [[0.5, 0.2], [0.2, 0.4]], [[0.4, -0.15], [-0.15, 0.3]]], dtype=F64),
)


pytestmark = pytest.mark.usefixtures("one_thread")


def diffusion(var: ModelVarType = ModelVarType.FIXED_SMALL) -> GaussianDiffusion:
    return gaussian_diffusion(var=var, clip_range=None)


def draw(
    sampler,
    gmm: GaussianMixture = GMM,
    cond=None,
    guidance=None,
    seed: int = 0,
    var=ModelVarType.FIXED_SMALL,
    model=None,
    n: int = N,
) -> torch.Tensor:
    d = diffusion(var)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 2, generator=g, dtype=F64)
    model = exact_eps_model(gmm, d) if model is None else model
    return sampler.sample(d, model, (n, 2), cond=cond, guidance=guidance, generator=g, noise=noise)


def assign(x: torch.Tensor, gmm: GaussianMixture) -> torch.Tensor:
    """The most likely component of each sample under the clean mixture."""
    return gmm.posterior(x, torch.ones(len(x), dtype=F64)).argmax(-1)


def check_gaussian(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor, bias: float) -> None:
    n, var = len(x), cov.diagonal()
    mean_tol = 4 * (var / n).sqrt() + bias
    cov_tol = 4 * ((var[:, None] * var[None, :] + cov**2) / n).sqrt() + bias
    assert ((x.mean(0) - mean).abs() < mean_tol).all(), (x.mean(0), mean, mean_tol)
    assert ((torch.cov(x.T) - cov).abs() < cov_tol).all(), (torch.cov(x.T), cov, cov_tol)


def check_mixture(x: torch.Tensor, gmm: GaussianMixture = GMM, bias: float = 0.05) -> None:
    k = assign(x, gmm)
    for j, w in enumerate(gmm.weights.tolist()):
        sel = x[k == j]
        assert abs(len(sel) / len(x) - w) < 4 * math.sqrt(w * (1 - w) / len(x)), (j, len(sel) / len(x), w)
        check_gaussian(sel, gmm.means[j], gmm.covs[j], bias)


def test_mixture_reference_passes_its_own_check() -> None:
    """The check itself: exact draws pass with no allowance, a 10% scaled copy fails."""
    x, _ = GMM.sample(N, torch.Generator().manual_seed(1))
    check_mixture(x, bias=0.0)
    with pytest.raises(AssertionError):
        check_mixture(1.1 * x, bias=0.0)


@pytest.mark.parametrize(
    ("sampler", "bias"),
    [
        (AncestralSampler(SamplerConfig(steps=1000, clip=False)), 0.01),
        (AncestralSampler(SamplerConfig(steps=100, clip=False)), 0.05),  # respacing preserves the marginals
        (AncestralSampler(SamplerConfig(steps="ddim50", clip=False)), 0.09),
        (DDIMSampler(DDIMConfig(steps=50, clip=False)), 0.05),
        (DDIMSampler(DDIMConfig(steps=50, eta=1.0, clip=False)), 0.08),
        (DPMSolverPlusPlus2M(SamplerConfig(steps=20, clip=False)), 0.025),
    ],
    ids=["ddpm-1000", "ddpm-100-respaced", "ddpm-ddim50-respaced", "ddim-50", "ddim-50-eta1", "dpm-solver++-20"],
)
def test_samplers_reproduce_the_mixture(sampler, bias: float) -> None:
    """``bias``: the largest mean or covariance error of the sampler measured with N = 40000 (docs/diffusion.md)."""
    check_mixture(draw(sampler), bias=bias)


def test_fixed_large_variance_also_reproduces_the_mixture() -> None:
    check_mixture(
        draw(AncestralSampler(SamplerConfig(steps=250, clip=False)), var=ModelVarType.FIXED_LARGE), bias=0.015
    )


def test_ode_samplers_converge_at_their_order() -> None:
    """From the same noise, DDIM (eta 0) is first order and DPM-Solver++(2M) second order in the step.

    Errors are against DPM-Solver++ at 999 steps. Measured: DDIM 0.146 -> 0.073 from 20 to 40 steps
    (order 1.0); DPM-Solver++ 0.130 -> 0.025 -> 0.0047 from 10 to 20 to 40 (order 2.4).
    """
    d = diffusion()
    model, noise = exact_eps_model(GMM, d), torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    ref = DPMSolverPlusPlus2M(SamplerConfig(steps=999, clip=False)).sample(d, model, (300, 2), noise=noise)

    def err(sampler) -> float:
        return (sampler.sample(d, model, (300, 2), noise=noise) - ref).norm(dim=1).mean().item()

    ddim = [err(DDIMSampler(DDIMConfig(steps=n, clip=False))) for n in (20, 40)]
    dpm = [err(DPMSolverPlusPlus2M(SamplerConfig(steps=n, clip=False))) for n in (10, 20, 40)]
    assert 0.8 < math.log2(ddim[0] / ddim[1]) < 1.2, ddim
    assert math.log2(dpm[0] / dpm[1]) > 1.8 and math.log2(dpm[1] / dpm[2]) > 1.8, dpm


def test_too_few_ddim_steps_are_visibly_worse() -> None:
    """The checks can fail: DDIM at 5 steps misses the covariances (the ODE is far from converged)."""
    with pytest.raises(AssertionError):
        check_mixture(draw(DDIMSampler(DDIMConfig(steps=5, clip=False))), bias=0.02)


# ------------------------------------------------------------------ respacing and model calls


def spy_on(model, seen: list):
    def spy(x, t, cond):
        seen.append(t.tolist())
        return model(x, t, cond)

    return spy


@pytest.mark.parametrize(
    "sampler",
    [
        AncestralSampler(SamplerConfig(steps=50, clip=False)),
        DDIMSampler(DDIMConfig(steps="ddim25", clip=False)),
        DPMSolverPlusPlus2M(SamplerConfig(steps=20, clip=False)),
        DPMSolverPlusPlus2M(SamplerConfig(steps="10,5", clip=False)),
    ],
    ids=["ddpm-50", "ddim-ddim25", "dpm-20", "dpm-sections"],
)
def test_sampler_always_respaces_and_calls_the_model_with_original_steps(sampler) -> None:
    """Fewer steps are never a truncated chain: the model sees exactly the respaced ORIGINAL indices, from the top
    down."""
    d, seen = diffusion(), []
    sampler.sample(d, spy_on(exact_eps_model(GMM, d), seen), (3, 2), noise=torch.randn(3, 2, dtype=F64))
    grid = sorted(space_timesteps(1000, sampler.grid()), reverse=True)
    assert len(seen) == sampler.nfe() and [s[0] for s in seen] == grid[: sampler.nfe()]
    assert all(len(set(s)) == 1 for s in seen)
    assert seen[0][0] == (960 if sampler.cfg.steps == "ddim25" else 999)  # DDIM's stride 40 starts at 960


def test_respaced_process_is_cached_and_too_many_steps_are_refused() -> None:
    d, s = diffusion(), DDIMSampler(DDIMConfig(steps=50))
    assert s.respaced(d) is s.respaced(d) and s.respaced(d).num_timesteps == 50
    with pytest.raises(ValueError, match="steps=1001 needs 1001 timesteps but the model has 1000"):
        DDIMSampler(DDIMConfig(steps=1001)).respaced(d)
    with pytest.raises(ValueError, match="steps=1000 needs 1001 timesteps"):  # DPM-Solver++ needs one more grid point
        DPMSolverPlusPlus2M(SamplerConfig(steps=1000)).respaced(d)
    for one in (1, "1"):  # one step keeps only t = 1: the "sample" would be the noise, clamped
        with pytest.raises(
            ValueError, match="starts the chain at t = 1 of 1000, but x_T is pure noise; use steps >= 2"
        ):
            DDIMSampler(DDIMConfig(steps=one)).respaced(d)
    with pytest.raises(ValueError, match="steps='5,0' starts the chain at t = 500 of 1000"):
        DDIMSampler(DDIMConfig(steps="5,0")).respaced(d)
    with pytest.raises(ValueError, match="steps=0 keeps no step of 1000"):
        DDIMSampler(DDIMConfig(steps=0)).respaced(d)
    assert (
        DPMSolverPlusPlus2M(SamplerConfig(steps=1)).respaced(d).timestep_map[-1] == 999
    )  # its grid has a second point


@pytest.mark.parametrize(
    "sampler",
    [
        AncestralSampler(SamplerConfig(steps=10)),
        DDIMSampler(DDIMConfig(steps=10, eta=0.5)),
        DPMSolverPlusPlus2M(SamplerConfig(steps=10)),
    ],
    ids=["ddpm", "ddim", "dpm"],
)
@pytest.mark.parametrize("var", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE])
def test_dirac_data_is_recovered_exactly_for_any_shape(sampler, var) -> None:
    assert_ends_at_dirac(sampler, var)


def test_clipping_and_dynamic_thresholding_bound_x0() -> None:
    d = gaussian_diffusion(100)
    wild = lambda x, t, c: torch.full_like(x, -50.0)  # noqa: E731  implies a far out-of-range x0
    gen = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert DDIMSampler(DDIMConfig(steps=10)).sample(d, wild, (2, 1, 4, 4), generator=gen()).abs().max() <= 1.0 + 1e-6
    assert DDIMSampler(DDIMConfig(steps=10, clip=False)).sample(d, wild, (2, 1, 4, 4), generator=gen()).abs().max() > 5
    # Imagen: s = the p-quantile of |x0| (at least 1); x0 -> clamp(x0, -s, s) / s
    x0 = torch.linspace(-3, 3, 101).repeat(2, 1)
    out = DDIMSampler(DDIMConfig(threshold=0.9)).process_xstart(d)(x0)
    s = torch.quantile(x0.abs(), 0.9, dim=1, keepdim=True)
    torch.testing.assert_close(out, x0.clamp(-s, s) / s)
    assert out.abs().max() == 1.0 and (out.diff(dim=1) >= 0).all()


class _Push(GradientGuidance):
    """A constant guidance gradient: s grad log p(y | x_t) = g everywhere."""

    def __init__(self, g: float) -> None:
        self.scale, self.g = 1.0, g

    def grad_log_p(self, x_t: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        return torch.full_like(x_t, self.g)


def test_eps_form_guidance_moves_x0_by_the_closed_form_and_a_clipping_sampler_clamps_it() -> None:
    """eps' = eps - sqrt(1 - abar) s g moves x0_hat by (1 - abar) / sqrt(abar) s g: 2e4 s g at t = T of the cosine
    schedule (abar_T = 2.4e-9). A clipping sampler clamps the guided x0_hat as it clamps the unguided one, eps
    following."""
    d = gaussian_diffusion(1000, "cosine")
    at_zero = lambda x, t, c: x / d.extract("sqrt_one_minus_abar", t, x)  # noqa: E731  the exact eps of data at 0
    free, clipped = DDIMSampler(DDIMConfig(steps=10, clip=False)), DDIMSampler(DDIMConfig(steps=10))
    proc = free.respaced(d)
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=F64)
    g, top = 0.01, torch.full((3,), proc.num_timesteps - 1)
    for t in (top, torch.full((3,), 2)):  # where the clamp binds, and where it does not
        abar = proc.extract("abar", t, x)
        pushed = free.predict(proc, proc.wrap(at_zero), x, t, None, _Push(g), eps_form=True)
        torch.testing.assert_close(pushed.pred_xstart, ((1 - abar) / abar.sqrt() * g).expand_as(x))
        kept = clipped.predict(proc, proc.wrap(at_zero), x, t, None, _Push(g), eps_form=True)
        torch.testing.assert_close(kept.pred_xstart, pushed.pred_xstart.clamp(-1, 1))
        torch.testing.assert_close(abar.sqrt() * kept.pred_xstart + (1 - abar).sqrt() * kept.pred_eps, x)
    assert free.predict(proc, proc.wrap(at_zero), x, top, None, _Push(g), eps_form=True).pred_xstart.min() > 100
    unguided = clipped.predict(proc, proc.wrap(at_zero), x, top, None, DiffusionGuidance(), eps_form=True)
    assert unguided.pred_xstart.abs().max() < 1e-6


def test_generator_makes_sampling_reproducible() -> None:
    d, m = diffusion(), exact_eps_model(GMM, diffusion())
    s = AncestralSampler(SamplerConfig(steps=20, clip=False))
    a = s.sample(d, m, (5, 2), generator=torch.Generator().manual_seed(3))
    b = s.sample(d, m, (5, 2), generator=torch.Generator().manual_seed(3))
    c = s.sample(d, m, (5, 2), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


# ------------------------------------------------------------------ guidance, with overlapping components
OVERLAP = GaussianMixture(
    weights=torch.tensor([0.7, 0.3], dtype=F64),
    means=torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=F64),
    covs=torch.eye(2, dtype=F64).repeat(2, 1, 1) * 0.5,
)
Y = {"y": torch.ones(N, dtype=torch.long)}  # the minority component


def unconditional(model):
    return lambda x, t, c: model(x, t, None)  # the denoiser of classifier guidance knows nothing of y


def fraction_assigned(x: torch.Tensor) -> float:
    return (assign(x, OVERLAP) == 1).double().mean().item()


def exact_fraction() -> float:
    """The fraction of exact draws from component 1 that the Bayes rule assigns to it."""
    x = OVERLAP.means[1] + math.sqrt(0.5) * torch.randn(
        200_000, 2, generator=torch.Generator().manual_seed(0), dtype=F64
    )
    return fraction_assigned(x)


def test_classifier_gradient_is_the_closed_form_one_even_under_inference_mode() -> None:
    """grad log p(y | x_t) = grad log q(x_t | y) - grad log q(x_t); autograd works inside no_grad and inference_mode."""
    d = diffusion().respace(range(0, 1000, 10))  # respaced: the classifier must receive original indices
    exact = exact_eps_model(OVERLAP, diffusion())
    guidance = ClassifierGuidance(exact.classifier, scale=2.5)
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    t, y = torch.tensor([0, 5, 20, 50, 80, 99]), torch.tensor([0, 1, 1, 0, 1, 0])
    want = 2.5 * exact.grad_log_p_y(x, d.model_t(t), y)
    with torch.inference_mode():
        got = guidance.gradient(d, x.clone(), t.clone(), {"y": y.clone()})
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(guidance.gradient(d, x, t, {"y": y}), want)
    with pytest.raises(ValueError, match="classifier guidance needs a class"):
        guidance.gradient(d, x, t, None)


class _LinearClassifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 3, dtype=F64)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


def test_guided_sampling_can_be_profiled() -> None:
    """FlopCounterMode hooks every module and refuses autograd.grad; the guidance gradient still works under it."""
    from genzoo.nn.unet import flop_counter

    torch.manual_seed(0)
    d, guidance = diffusion(), ClassifierGuidance(_LinearClassifier(), scale=1.0)
    x, t, y = torch.randn(4, 2, dtype=F64), torch.tensor([1, 10, 100, 500]), torch.tensor([0, 1, 2, 0])
    want = guidance.gradient(d, x, t, {"y": y})
    with flop_counter() as fc:
        got = guidance.gradient(d, x, t, {"y": y})
    torch.testing.assert_close(got, want)
    assert fc.get_total_flops() > 0
    assert all(p.grad is None for p in guidance.parameters())  # only the input's gradient is taken


@pytest.mark.parametrize(
    ("sampler", "bias"),
    [
        (AncestralSampler(SamplerConfig(steps=250, clip=False)), 0.03),
        (DDIMSampler(DDIMConfig(steps=50, clip=False)), 0.02),
    ],
    ids=["ancestral", "ddim"],
)
def test_classifier_guidance_samples_the_conditional(sampler, bias: float) -> None:
    """Scale 1 with the exact classifier samples p(x | y) = N(mu_y, S_y); scale 3 concentrates further on y."""
    model = unconditional(exact_eps_model(OVERLAP, diffusion()))
    classifier = exact_classifier(OVERLAP, diffusion())
    x1 = draw(sampler, OVERLAP, cond=Y, guidance=ClassifierGuidance(classifier, scale=1.0), model=model)
    check_gaussian(x1, OVERLAP.means[1], OVERLAP.covs[1], bias)
    p = exact_fraction()  # 0.867: the components overlap
    assert abs(fraction_assigned(x1) - p) < 4 * math.sqrt(p * (1 - p) / N)
    x3 = draw(sampler, OVERLAP, cond=Y, guidance=ClassifierGuidance(classifier, scale=3.0), model=model)
    assert fraction_assigned(x3) > fraction_assigned(x1) + 0.05
    assert x3[:, 0].mean() > x1[:, 0].mean() + 0.1


@pytest.mark.parametrize(
    "sampler",
    [DDIMSampler(DDIMConfig(steps=20, clip=False)), DPMSolverPlusPlus2M(SamplerConfig(steps=10, clip=False))],
    ids=["ddim", "dpm-solver++"],
)
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_cfg_with_exact_models_equals_classifier_guidance(sampler, scale: float) -> None:
    """eps_u + s (eps_c - eps_u) = eps_u - sqrt(1 - abar) s grad log p(y | x_t): with exact models the eps forms
    coincide."""
    assert_cfg_is_classifier_guidance(lambda: sampler, scale, n=500)


def assert_cfg_is_classifier_guidance(sampler, scale: float, n: int) -> None:
    """CFG at ``scale`` with the exact conditional model of OVERLAP draws the same ``n`` samples of class 1 as
    classifier guidance at ``scale`` with its exact classifier and unconditional model (to 1e-6), each drawn with
    ``sampler()`` from the same seed."""
    model = exact_eps_model(OVERLAP, diffusion())
    y = {"y": torch.ones(n, dtype=torch.long)}
    cfg = draw(sampler(), OVERLAP, cond=y, guidance=ClassifierFreeGuidance(CFGConfig(scale=scale)), model=model, n=n)
    guidance = ClassifierGuidance(model.classifier, scale=scale)
    cg = draw(sampler(), OVERLAP, cond=y, guidance=guidance, model=unconditional(model), n=n)
    torch.testing.assert_close(cfg, cg, atol=1e-6, rtol=1e-6)


def test_classifier_free_guidance_moves_mass_toward_the_class() -> None:
    """s = 1: the conditional N(mu_y, S_y); s = 0: the unconditional mixture; s > 1: more mass on y, monotonically."""
    sampler = AncestralSampler(SamplerConfig(steps=250, clip=False))
    by_scale = {
        s: draw(sampler, OVERLAP, cond=Y, guidance=ClassifierFreeGuidance(CFGConfig(scale=s)))
        for s in (0.0, 1.0, 1.5, 3.0)
    }
    check_gaussian(by_scale[1.0], OVERLAP.means[1], OVERLAP.covs[1], 0.03)
    # s = 0: the unconditional mixture, whose mean is sum_k w_k mu_k = (-0.4, 0) and variance along x 0.5 + 4 w0 w1
    # = 1.34
    assert torch.allclose(by_scale[0.0].mean(0), OVERLAP.weights @ OVERLAP.means, atol=4 * math.sqrt(1.34 / N) + 0.02)
    assert fraction_assigned(by_scale[0.0]) < 0.5
    fractions = [fraction_assigned(by_scale[s]) for s in (1.0, 1.5, 3.0)]
    means = [by_scale[s][:, 0].mean().item() for s in (1.0, 1.5, 3.0)]
    assert fractions[0] + 0.03 < fractions[1] <= fractions[2], fractions
    assert means[0] + 0.1 < means[1] < means[2] - 0.1, means  # pushed past mu_y, away from the other component


def test_cfg_batches_both_passes_into_one_forward() -> None:
    d, calls = diffusion(), []
    model = exact_eps_model(OVERLAP, d)

    def spy(x, t, cond):
        calls.append(x.shape[0])
        assert (
            cond["drop"].tolist() == [False, True, False] + [True] * 3
        )  # the caller's drop kept on the conditional half
        assert cond["name"] == "kept" and cond["emb"].shape == (6, 4)  # non-tensors pass, every tensor doubles
        return model(x, t, cond)

    cond = {
        "y": torch.ones(3, dtype=torch.long),
        "emb": torch.zeros(3, 4),
        "name": "kept",
        "drop": torch.tensor([False, True, False]),
    }
    DDIMSampler(DDIMConfig(steps=10, clip=False)).sample(
        d,
        spy,
        (3, 2),
        cond=cond,
        guidance=ClassifierFreeGuidance(CFGConfig(scale=2.0)),
        noise=torch.randn(3, 2, dtype=F64),
    )
    assert calls == [6] * 10
    assert with_null_condition({"y": torch.zeros(2)}, 2, torch.device("cpu"))["drop"].tolist() == [
        False,
        False,
        True,
        True,
    ]


def test_cfg_mixes_only_the_eps_channels_of_a_learned_variance() -> None:
    def model(x, t, cond):  # eps channel: 1 conditional, 3 null; variance channel: 0.25 conditional, -0.75 null
        null = cond["drop"].view(-1, 1, 1, 1).to(x.dtype)
        return torch.cat([1 + 2 * null, 0.25 - null], dim=1).expand(-1, 2, 2, 2)

    out = ClassifierFreeGuidance(CFGConfig(scale=3.0)).model_output(
        model, torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), {"y": torch.zeros(2)}
    )
    assert out.shape == (2, 2, 2, 2)
    assert (out[:, 0] == 3 + 3 * (1 - 3)).all() and (out[:, 1] == 0.25).all()
