"""Schedules, posterior coefficients, parameterisations and losses against their formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule, space_timesteps
from genzoo.diffusion.gaussian_diffusion import LossAwareSampler, discretized_gaussian_log_likelihood


def make(T=1000, schedule="linear", mean=ModelMeanType.EPSILON, var=ModelVarType.FIXED_SMALL, loss=LossType.SIMPLE):
    return GaussianDiffusion(betas=get_named_beta_schedule(schedule, T), model_mean_type=mean, model_var_type=var, loss_type=loss)


def test_linear_schedule_scales_with_T() -> None:
    b = get_named_beta_schedule("linear", 1000)
    assert b[0] == 1e-4 and b[-1] == pytest.approx(0.02) and b.dtype == np.float64
    b250 = get_named_beta_schedule("linear", 250)
    assert b250[0] == pytest.approx(4e-4) and b250[-1] == pytest.approx(0.08)


def test_cosine_schedule_matches_f_and_clips() -> None:
    T = 1000
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    abar = make(schedule="cosine").tables["abar"]
    for t in (0, 10, 500, 900):
        assert abar[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert get_named_beta_schedule("cosine", T).max() == pytest.approx(0.999)


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_coefficients(t: int) -> None:
    d = make()
    b = d.tables["betas"]
    abar = np.cumprod(1 - b)
    a_prev = abar[t - 1]
    assert d.tables["posterior_mean_coef1"][t] == pytest.approx(math.sqrt(a_prev) * b[t] / (1 - abar[t]), rel=1e-12)
    assert d.tables["posterior_mean_coef2"][t] == pytest.approx(math.sqrt(1 - b[t]) * (1 - a_prev) / (1 - abar[t]), rel=1e-12)
    assert d.tables["posterior_variance"][t] == pytest.approx(b[t] * (1 - a_prev) / (1 - abar[t]), rel=1e-12)


def test_log_variance_at_t0_is_clipped_to_t1() -> None:
    d = make()
    assert d.tables["posterior_variance"][0] == 0
    assert d.tables["posterior_log_variance_clipped"][0] == d.tables["posterior_log_variance_clipped"][1]


def test_q_sample_moments() -> None:
    d, t = make(), 300
    x0 = torch.full((20000, 1), 0.7, dtype=torch.float64)
    xt = d.q_sample(x0, torch.full((20000,), t), torch.randn(20000, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64))
    a = d.tables["abar"][t]
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=0.02)
    assert xt.var().item() == pytest.approx(1 - a, rel=0.03)


def test_parameterisations_round_trip() -> None:
    d = make()
    x0, eps = torch.randn(8, 3, 4, 4, dtype=torch.float64), torch.randn(8, 3, 4, 4, dtype=torch.float64)
    t = torch.arange(8) * 120
    xt = d.q_sample(x0, t, eps)
    torch.testing.assert_close(d.predict_xstart_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(d.predict_eps_from_xstart(xt, t, x0), eps)
    torch.testing.assert_close(d.predict_xstart_from_v(xt, t, d.v_target(x0, t, eps)), x0)
    for mean, out in ((ModelMeanType.START_X, x0), (ModelMeanType.VELOCITY, d.v_target(x0, t, eps))):
        pred = make(mean=mean).p_mean_variance(out, xt, t)
        torch.testing.assert_close(pred.pred_xstart, x0)
        torch.testing.assert_close(pred.pred_eps, eps)


def test_learned_range_endpoints() -> None:
    d = make(var=ModelVarType.LEARNED_RANGE)
    x = torch.zeros(2, 1, 2, 2, dtype=torch.float64)
    t = torch.tensor([5, 700])
    lo = d.p_mean_variance(torch.cat([x, -torch.ones_like(x)], 1), x, t).log_variance
    hi = d.p_mean_variance(torch.cat([x, torch.ones_like(x)], 1), x, t).log_variance
    torch.testing.assert_close(lo[:, 0, 0, 0], torch.tensor(d.tables["posterior_log_variance_clipped"][[5, 700]]))
    torch.testing.assert_close(hi[:, 0, 0, 0], torch.log(torch.tensor(d.tables["betas"][[5, 700]])))


def test_vlb_is_zero_for_the_true_posterior_and_the_decoder_likelihood_normalises() -> None:
    d = make()
    x0, eps = torch.rand(4, 3, dtype=torch.float64) * 2 - 1, torch.randn(4, 3, dtype=torch.float64)
    t = torch.tensor([1, 10, 400, 999])
    xt = d.q_sample(x0, t, eps)
    assert d.vb_terms_bpd(eps, x0, xt, t).abs().max() < 1e-9  # eps exact => mean exact, fixed-small var exact
    bins = torch.linspace(-1, 1, 256, dtype=torch.float64)
    p = discretized_gaussian_log_likelihood(bins, means=torch.tensor(0.1, dtype=torch.float64), log_scales=torch.tensor(math.log(0.3))).exp()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-3)


def test_hybrid_loss_trains_the_variance_only_through_vlb() -> None:
    d = make(var=ModelVarType.LEARNED_RANGE, loss=LossType.HYBRID)
    out = torch.zeros(4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t, c: out, torch.rand(4, 2) * 2 - 1, torch.tensor([0, 3, 500, 999]))
    (g,) = torch.autograd.grad(terms["vlb"].sum(), out)
    assert g[:, :2].abs().max() == 0 and g[:, 2:].abs().max() > 0
    assert torch.allclose(terms["loss"], terms["mse"] + terms["vlb"])  # lambda * T = 0.001 * 1000
    assert terms["vlb"].mean() < 50 * terms["mse"].mean()  # same order as the mse, as in practice


def test_respacing() -> None:
    d = make()
    keep = space_timesteps(1000, "10,10,3")
    assert len(keep) == 23 and min(keep) == 0 and max(keep) == 999
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    r = d.respace(keep)
    np.testing.assert_allclose(r.tables["abar"], d.tables["abar"][sorted(keep)], rtol=1e-12)
    assert list(r.timestep_map) == sorted(keep)
    with pytest.raises(ValueError, match="cannot take 400 steps out of a section of 334 timesteps"):
        space_timesteps(1000, "400,10,10")


def test_loss_aware_sampler_weights() -> None:
    s = LossAwareSampler(4)
    t, w = s.sample(6, torch.device("cpu"))
    assert torch.equal(w, torch.ones(6))  # uniform until the history is full
    for _ in range(10):
        s.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p = s.weights()
    want = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64) / 10 * 0.999 + 0.001 / 4
    torch.testing.assert_close(p, want)


def test_bpd_loop_with_the_exact_model_is_finite_and_positive() -> None:
    d = make(T=50)
    x0 = torch.rand(3, 2, dtype=torch.float64) * 2 - 1
    out = d.calc_bpd_loop(lambda x, t, c: torch.zeros_like(x), x0)
    assert out["vb"].shape == (3, 50) and torch.isfinite(out["total_bpd"]).all() and (out["total_bpd"] > 0).all()
