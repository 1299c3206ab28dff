"""Samplers and guidances against a Gaussian mixture whose exact denoiser is known in closed form.

Tolerances (n = 3000 samples, 2-D): mixture weights within 0.04 (about 4 standard errors of a
proportion), means within 0.12 and covariance entries within 0.12 (sampling error of a covariance
from ~1000 points is ~0.02-0.03; the rest is discretisation error of the sampler at its step count).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from genzoo.diffusion import (
    AncestralSampler, ClassifierFreeGuidance, DDIMSampler, DPMSolverPlusPlus2M, GaussianDiffusion, LossType,
    ModelMeanType, ModelVarType, get_named_beta_schedule, space_timesteps,
)
from genzoo.diffusion.gmm import GaussianMixture, exact_classifier, exact_eps_model
from genzoo.diffusion.guidance import CFGConfig, ClassifierGuidance
from genzoo.diffusion.samplers import DDIMConfig, SamplerConfig

N = 3000
GMM = GaussianMixture(
    weights=torch.tensor([0.3, 0.7], dtype=torch.float64),
    means=torch.tensor([[-2.0, 0.0], [2.0, 1.0]], dtype=torch.float64),
    covs=torch.tensor([[[0.3, 0.0], [0.0, 0.5]], [[0.5, 0.2], [0.2, 0.4]]], dtype=torch.float64),
)


def diffusion(var=ModelVarType.FIXED_SMALL) -> GaussianDiffusion:
    return GaussianDiffusion(betas=get_named_beta_schedule("linear", 1000), model_mean_type=ModelMeanType.EPSILON,
                             model_var_type=var, loss_type=LossType.SIMPLE, clip_range=None)


def draw(sampler, gmm=GMM, cond=None, guidance=None, seed=0, var=ModelVarType.FIXED_SMALL, unconditional=False) -> torch.Tensor:
    d = diffusion(var)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(N, 2, generator=g, dtype=torch.float64)
    model = exact_eps_model(gmm, d)
    if unconditional:  # the model of classifier guidance knows nothing of y
        model = lambda x, t, c, m=model: m(x, t, None)  # noqa: E731
    return sampler.sample(d, model, (N, 2), cond=cond, guidance=guidance, generator=g, noise=noise)


def check_mixture(x: torch.Tensor, gmm=GMM, w_tol=0.04, tol=0.12) -> None:
    k = gmm.posterior(x, torch.ones(len(x), dtype=torch.float64)).argmax(-1)
    for j in range(len(gmm.weights)):
        sel = x[k == j]
        assert abs(len(sel) / len(x) - gmm.weights[j].item()) < w_tol
        assert torch.allclose(sel.mean(0), gmm.means[j], atol=tol), (j, sel.mean(0))
        assert torch.allclose(torch.cov(sel.T), gmm.covs[j], atol=tol), (j, torch.cov(sel.T))


@pytest.mark.parametrize("sampler", [
    AncestralSampler(SamplerConfig(steps=1000, clip=False)),
    AncestralSampler(SamplerConfig(steps=100, clip=False)),  # respacing preserves the marginals
    DDIMSampler(DDIMConfig(steps=50, clip=False)),
    DDIMSampler(DDIMConfig(steps=50, eta=1.0, clip=False)),
    DPMSolverPlusPlus2M(SamplerConfig(steps=20, clip=False)),
], ids=["ddpm-1000", "ddpm-100-respaced", "ddim-50", "ddim-50-eta1", "dpm-solver++-20"])
def test_samplers_reproduce_the_mixture(sampler) -> None:
    check_mixture(draw(sampler))


def test_fixed_large_variance_also_reproduces_the_mixture() -> None:
    check_mixture(draw(AncestralSampler(SamplerConfig(steps=1000, clip=False)), var=ModelVarType.FIXED_LARGE), tol=0.15)


def test_sampler_always_respaces_and_calls_the_model_with_original_steps() -> None:
    d = diffusion()
    seen = []
    model = exact_eps_model(GMM, d)

    def spy(x, t, cond):
        seen.append(int(t[0]))
        return model(x, t, cond)

    DDIMSampler(DDIMConfig(steps=50, clip=False)).sample(d, spy, (4, 2), noise=torch.randn(4, 2, dtype=torch.float64))
    assert len(seen) == 50 and seen == sorted(space_timesteps(1000, 50), reverse=True)
    assert seen[0] == 999 and seen[-1] == 0


# ------------------------------------------------------------------ guidance, with overlapping components
OVERLAP = GaussianMixture(
    weights=torch.tensor([0.5, 0.5], dtype=torch.float64),
    means=torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64),
    covs=torch.eye(2, dtype=torch.float64).repeat(2, 1, 1) * 0.5,
)
Y = {"y": torch.ones(N, dtype=torch.long)}


class ExactClassifierGuidance(ClassifierGuidance):
    def __init__(self, scale: float) -> None:
        super().__init__(torch.nn.Identity(), scale=scale)
        self.exact = exact_classifier(OVERLAP, diffusion())

    def grad_log_p(self, x_t, t_model, cond):
        with torch.enable_grad():
            x = x_t.detach().requires_grad_(True)
            return torch.autograd.grad(self.exact(x, t_model).gather(1, cond["y"].view(-1, 1)).sum(), x)[0]


@pytest.mark.parametrize("sampler", [AncestralSampler(SamplerConfig(steps=250, clip=False)), DDIMSampler(DDIMConfig(steps=50, clip=False))],
                         ids=["ancestral", "ddim"])
def test_classifier_guidance_samples_the_conditional(sampler) -> None:
    """Scale 1 with the exact classifier gives p(x | y) = N(mu_y, S_y); a larger scale tilts further from the other class."""
    x1 = draw(sampler, OVERLAP, cond=Y, guidance=ExactClassifierGuidance(1.0), unconditional=True)
    assert torch.allclose(x1.mean(0), OVERLAP.means[1], atol=0.1), x1.mean(0)
    assert torch.allclose(torch.cov(x1.T), OVERLAP.covs[1], atol=0.1)
    x3 = draw(sampler, OVERLAP, cond=Y, guidance=ExactClassifierGuidance(3.0), unconditional=True)
    assert x3[:, 0].mean() > x1[:, 0].mean() + 0.1
    assert (OVERLAP.posterior(x3, torch.ones(N, dtype=torch.float64))[:, 1] > 0.5).float().mean() > \
           (OVERLAP.posterior(x1, torch.ones(N, dtype=torch.float64))[:, 1] > 0.5).float().mean()


@pytest.mark.parametrize("sampler", [AncestralSampler(SamplerConfig(steps=250, clip=False)), DPMSolverPlusPlus2M(SamplerConfig(steps=20, clip=False))],
                         ids=["ancestral", "dpm-solver++"])
def test_classifier_free_guidance(sampler) -> None:
    """s = 1 is the conditional model; s = 3 moves mass away from the unconditional, toward and past mu_y."""
    x1 = draw(sampler, OVERLAP, cond=Y, guidance=ClassifierFreeGuidance(CFGConfig(scale=1.0)))
    assert torch.allclose(x1.mean(0), OVERLAP.means[1], atol=0.1) and torch.allclose(torch.cov(x1.T), OVERLAP.covs[1], atol=0.1)
    x3 = draw(sampler, OVERLAP, cond=Y, guidance=ClassifierFreeGuidance(CFGConfig(scale=3.0)))
    assert x3[:, 0].mean() > x1[:, 0].mean() + 0.2
    x0 = draw(sampler, OVERLAP, cond=Y, guidance=ClassifierFreeGuidance(CFGConfig(scale=0.0)))  # s = 0: unconditional
    assert abs(x0[:, 0].mean()) < 0.1


def test_cfg_batches_both_passes_into_one_forward() -> None:
    d = diffusion()
    calls = []
    model = exact_eps_model(OVERLAP, d)

    def spy(x, t, cond):
        calls.append(x.shape[0])
        assert cond["drop"].tolist() == [False] * 5 + [True] * 5
        return model(x, t, cond)

    DDIMSampler(DDIMConfig(steps=10, clip=False)).sample(d, spy, (5, 2), cond={"y": torch.ones(5, dtype=torch.long)},
                                                         guidance=ClassifierFreeGuidance(CFGConfig(scale=2.0)),
                                                         noise=torch.randn(5, 2, dtype=torch.float64))
    assert calls == [10] * 10


def test_clipping_bounds_x0_for_images() -> None:
    d = GaussianDiffusion(betas=get_named_beta_schedule("linear", 100), model_mean_type=ModelMeanType.EPSILON,
                          model_var_type=ModelVarType.FIXED_SMALL, loss_type=LossType.SIMPLE)
    wild = lambda x, t, c: torch.full_like(x, -50.0)  # noqa: E731  implies a far out-of-range x0
    x = DDIMSampler(DDIMConfig(steps=10)).sample(d, wild, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert x.abs().max() <= 1.0 + 1e-6
    free = DDIMSampler(DDIMConfig(steps=10, clip=False)).sample(d, wild, (2, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    assert free.abs().max() > 5
    np.testing.assert_equal(DPMSolverPlusPlus2M(SamplerConfig(steps=10)).nfe(), 10)
