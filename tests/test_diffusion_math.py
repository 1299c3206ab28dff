"""Schedules, posterior coefficients, parameterisations and losses against their closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny import gaussian_diffusion

from genzoo.diffusion import LossType, ModelMeanType, ModelVarType, get_named_beta_schedule, space_timesteps
from genzoo.diffusion.gaussian_diffusion import LossAwareSampler, UniformSampler, discretized_gaussian_log_likelihood
from genzoo.diffusion.samplers import AncestralSampler, SamplerConfig

F64 = torch.float64


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ------------------------------------------------------------------ schedules


def test_linear_schedule_values_and_scaling_with_T() -> None:
    b = get_named_beta_schedule("linear", 1000)
    assert b.dtype == np.float64 and b[0] == 1e-4 and b[-1] == pytest.approx(0.02, rel=1e-12)
    assert b[500] == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-12)
    b250 = get_named_beta_schedule("linear", 250)
    assert b250[0] == pytest.approx(4e-4, rel=1e-12) and b250[-1] == pytest.approx(0.08, rel=1e-12)
    # the scaling keeps abar_T of the same order for every T (it would be 0.9 without it at T = 10)
    assert np.prod(1 - get_named_beta_schedule("linear", 50)) < 1e-4
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'; use 'linear' or 'cosine'"):
        get_named_beta_schedule("quadratic", 10)


@pytest.mark.parametrize("T", [1000, 100])
def test_cosine_schedule_matches_f_and_clips(T: int) -> None:
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    d = gaussian_diffusion(T=T, schedule="cosine")
    for t in (0, 1, T // 10, T // 2, 9 * T // 10):  # index t is the paper's t + 1
        assert d.tables["abar"][t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    betas = d.tables["betas"]
    assert betas[-1] == 0.999 and (betas[:-1] < 0.999).all()  # f(T) = 0 would give b_T = 1
    assert (np.diff(betas) > 0).all()


@pytest.mark.parametrize("t", [1, 2, 10, 500, 999])
def test_posterior_coefficients_match_the_formulas(t: int) -> None:
    d = gaussian_diffusion()
    b = get_named_beta_schedule("linear", 1000)
    abar = np.cumprod(1 - b)
    a_prev = abar[t - 1]
    assert d.tables["abar"][t] == pytest.approx(abar[t], rel=1e-12)
    assert d.tables["posterior_mean_coef1"][t] == pytest.approx(math.sqrt(a_prev) * b[t] / (1 - abar[t]), rel=1e-12)
    assert d.tables["posterior_mean_coef2"][t] == pytest.approx(
        math.sqrt(1 - b[t]) * (1 - a_prev) / (1 - abar[t]), rel=1e-12
    )
    assert d.tables["posterior_variance"][t] == pytest.approx(b[t] * (1 - a_prev) / (1 - abar[t]), rel=1e-12)


@pytest.mark.parametrize("t", [1, 50, 700])
def test_posterior_is_bayes_rule_on_the_two_gaussians(t: int) -> None:
    """q(x_{t-1} | x_t, x0) ∝ N(x_t; sqrt(a_t) x_{t-1}, b_t) N(x_{t-1}; sqrt(abar_{t-1}) x0, 1 - abar_{t-1}):
    precisions add."""
    d = gaussian_diffusion(schedule="cosine")
    b, abar_prev = d.tables["betas"][t], d.tables["abar_prev"][t]
    x0, xt = randn(3, 2), randn(3, 2, seed=1)
    precision = (1 - b) / b + 1 / (1 - abar_prev)
    want_mean = (math.sqrt(1 - b) / b * xt + math.sqrt(abar_prev) / (1 - abar_prev) * x0) / precision
    mean, var, logvar = d.q_posterior_mean_variance(x0, xt, torch.full((3,), t))
    torch.testing.assert_close(mean, want_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(var, torch.full_like(x0, 1 / precision), rtol=1e-10, atol=0)
    torch.testing.assert_close(logvar, var.log())


def test_log_variances_at_the_first_step_are_clipped() -> None:
    d = gaussian_diffusion()
    post, b = d.tables["posterior_variance"], d.tables["betas"]
    assert post[0] == 0  # btilde_1 = 0 exactly: its log is clipped to log btilde_2
    np.testing.assert_allclose(
        d.tables["posterior_log_variance_clipped"], np.log(np.append(post[1], post[1:])), rtol=1e-12
    )
    np.testing.assert_allclose(d.tables["log_betas_large"], np.log(np.append(post[1], b[1:])), rtol=1e-12)
    # the variance a fixed-small prediction carries (what guidance scales its gradient by) is the exact btilde:
    # 0 at t = 1, so classifier guidance does not move the last step (guided-diffusion's condition_mean)
    x, t = torch.zeros(2, 3, dtype=F64), torch.tensor([0, 500])
    pred = d.p_mean_variance(torch.zeros_like(x), x, t)
    torch.testing.assert_close(pred.variance[:, 0], torch.tensor(post[[0, 500]]))
    torch.testing.assert_close(pred.log_variance[:, 0], torch.tensor(np.log(post[[1, 500]])))


# ------------------------------------------------------------------ forward process and parameterisations


def test_q_sample_moments_and_q_mean_variance() -> None:
    d, t = gaussian_diffusion(), 300
    x0 = torch.full((20000, 1), 0.7, dtype=F64)
    xt = d.q_sample(x0, torch.full((20000,), t), randn(20000, 1))
    a = d.tables["abar"][t]
    assert xt.mean().item() == pytest.approx(math.sqrt(a) * 0.7, abs=4 * math.sqrt((1 - a) / 20000))
    assert xt.var().item() == pytest.approx(1 - a, rel=4 * math.sqrt(2 / 20000))
    mean, var, logvar = d.q_mean_variance(x0[:2], torch.full((2,), t))
    torch.testing.assert_close(mean, torch.full((2, 1), math.sqrt(a) * 0.7, dtype=F64))
    torch.testing.assert_close(var, torch.full((2, 1), 1 - a, dtype=F64))
    torch.testing.assert_close(logvar, var.log())


@pytest.mark.parametrize("shape", [(8, 3, 4, 4), (8, 5)])
def test_eps_x0_v_round_trips(shape: tuple[int, ...]) -> None:
    d = gaussian_diffusion(schedule="cosine")
    x0, eps = randn(*shape), randn(*shape, seed=1)
    t = torch.arange(8) * 142
    xt = d.q_sample(x0, t, eps)
    v = d._predict_v(x0, t, eps)
    torch.testing.assert_close(d._predict_xstart_from_eps(xt, t, eps), x0)
    torch.testing.assert_close(d._predict_eps_from_xstart(xt, t, x0), eps)
    torch.testing.assert_close(d._predict_xstart_from_v(xt, t, v), x0)
    torch.testing.assert_close(d._predict_eps_from_v(xt, t, v), eps)
    # every parameterisation fed its exact target implies the same x0, eps and mean
    preds = [
        gaussian_diffusion(schedule="cosine", mean=m).p_mean_variance(out, xt, t)
        for m, out in ((ModelMeanType.EPSILON, eps), (ModelMeanType.START_X, x0), (ModelMeanType.VELOCITY, v))
    ]
    true_mean, _, _ = d.q_posterior_mean_variance(x0, xt, t)
    for pred in preds:
        torch.testing.assert_close(pred.pred_xstart, x0)
        torch.testing.assert_close(pred.pred_eps, eps)
        torch.testing.assert_close(pred.mean, true_mean)


def test_a_learned_variance_without_the_vlb_and_a_reversed_blur_range_are_refused_when_resolved() -> None:
    from genzoo import api
    from genzoo.errors import RecipeError

    with pytest.raises(
        RecipeError,
        match="recipe 'iddpm-digits': components.decoder: decoder 'diffusion-decoder': var_type "
        "learned-range trains its variance only through L_vlb; set loss: hybrid",
    ):
        api.resolve_recipe("iddpm-digits", sets=["decoder.loss=simple"])
    with pytest.raises(
        RecipeError, match=r"'diffusion-decoder': low_res_blur \[0.6, 0.2\] must be \[lo, hi\] with 0 <= lo <= hi; see"
    ):
        api.resolve_recipe("ddpm-digits", sets=["decoder.low_res_blur=[0.6, 0.2]"])


def test_learned_range_interpolates_between_the_two_fixed_variances() -> None:
    d = gaussian_diffusion(var=ModelVarType.LEARNED_RANGE)
    x, t = torch.zeros(2, 3, dtype=F64), torch.tensor([5, 700])  # (B, D) vectors: channels are dim 1
    logvar = {
        v: d.p_mean_variance(torch.cat([x, torch.full_like(x, v)], 1), x, t).log_variance[:, 0]
        for v in (-1.0, 0.0, 1.0)
    }
    small = torch.tensor(d.tables["posterior_log_variance_clipped"][[5, 700]])
    large = torch.log(torch.tensor(d.tables["betas"][[5, 700]]))
    torch.testing.assert_close(logvar[-1.0], small)
    torch.testing.assert_close(logvar[1.0], large)
    torch.testing.assert_close(logvar[0.0], (small + large) / 2)  # the geometric mean of the variances
    with pytest.raises(ValueError, match="learned-range variance needs 6 output channels on dim 1"):
        d.p_mean_variance(x, x, t)


def test_tables_are_cast_to_the_input_and_cached() -> None:
    d = gaussian_diffusion()
    x32 = torch.zeros(2, 3)
    c = d.extract("abar", torch.tensor([0, 999]), x32)
    assert c.dtype == torch.float32 and c.shape == (2, 1)
    assert d.table("abar", x32.device, torch.float32) is d.table("abar", x32.device, torch.float32)
    with torch.inference_mode():  # a table first made while sampling still serves training afterwards
        d2 = gaussian_diffusion(mean=ModelMeanType.START_X)
        d2.q_posterior_mean_variance(x32, x32, torch.tensor([1, 2]))
    out = torch.zeros(2, 3, requires_grad=True)
    d2.training_losses(lambda x, t, c: out, x32, torch.tensor([1, 2]))["loss"].sum().backward()
    assert out.grad is not None


# ------------------------------------------------------------------ losses


def test_vlb_is_zero_for_the_true_posterior() -> None:
    d = gaussian_diffusion()
    x0, eps = torch.rand(4, 3, dtype=F64) * 2 - 1, randn(4, 3)
    t = torch.tensor([1, 10, 400, 999])
    xt = d.q_sample(x0, t, eps)
    assert d.vb_terms_bpd(eps, x0, xt, t).abs().max() < 1e-9  # eps exact => mean exact; fixed-small = the true variance
    assert (d.vb_terms_bpd(eps + 0.1, x0, xt, t) > 1e-6).all()


@pytest.mark.parametrize(("mean", "scale"), [(0.1, 0.3), (0.98, 0.02), (-1.0, 0.005), (0.0, 3.0)])
def test_discretised_likelihood_sums_to_one_over_the_256_bins(mean: float, scale: float) -> None:
    bins = torch.linspace(-1, 1, 256, dtype=F64)
    logp = discretized_gaussian_log_likelihood(
        bins, means=torch.tensor(mean, dtype=F64), log_scales=torch.tensor(math.log(scale), dtype=F64)
    )
    assert logp.exp().sum().item() == pytest.approx(
        1.0, abs=1e-12
    )  # the exact CDF (log_ndtr), not improved-diffusion's tanh


def test_training_losses_targets() -> None:
    x0, noise, t = randn(4, 2, 3), randn(4, 2, 3, seed=1), torch.tensor([0, 10, 500, 999])
    zero = lambda x, tt, c: torch.zeros_like(x)  # noqa: E731 (the loss is then the mean square of the target)
    for mean, target in ((ModelMeanType.EPSILON, noise), (ModelMeanType.START_X, x0)):
        terms = gaussian_diffusion(mean=mean).training_losses(zero, x0, t, noise=noise)
        torch.testing.assert_close(terms["loss"], target.pow(2).mean((1, 2)))
        assert "vlb" not in terms
    d = gaussian_diffusion(mean=ModelMeanType.VELOCITY)
    v = d._predict_v(x0, t, noise)
    torch.testing.assert_close(d.training_losses(zero, x0, t, noise=noise)["mse"], v.pow(2).mean((1, 2)))
    vlb = gaussian_diffusion(loss=LossType.VLB).training_losses(zero, x0, t, noise=noise)
    torch.testing.assert_close(vlb["loss"], 1000 * vlb["vlb"])


def test_hybrid_loss_trains_the_variance_only_through_vlb() -> None:
    d = gaussian_diffusion(var=ModelVarType.LEARNED_RANGE, loss=LossType.HYBRID)
    out = torch.zeros(4, 4, requires_grad=True)
    terms = d.training_losses(lambda x, t, c: out, torch.rand(4, 2) * 2 - 1, torch.tensor([0, 3, 500, 999]))
    (g,) = torch.autograd.grad(terms["vlb"].sum(), out)
    assert g[:, :2].abs().max() == 0 and g[:, 2:].abs().max() > 0  # the mean is detached inside the vlb
    torch.testing.assert_close(terms["loss"], terms["mse"] + 0.001 * 1000 * terms["vlb"])
    assert terms["vlb"].mean() < 50 * terms["mse"].mean()  # same order as the mse, as in practice


def test_prior_bpd_closed_form() -> None:
    d = gaussian_diffusion()
    x0 = torch.tensor([[0.5, -1.0]], dtype=F64)
    a = d.tables["abar"][-1]
    kl = 0.5 * (-1 - math.log(1 - a) + (1 - a) + a * x0.pow(2)) / math.log(2)
    torch.testing.assert_close(d.prior_bpd(x0), kl.mean(1))


def test_bpd_loop_with_an_oracle_model_is_the_prior_plus_the_decoder_term() -> None:
    """A model that knows x0 makes every KL term 0, so the NLL bound is L_T plus -log2 P(bin | N(x0, btilde_2))."""
    d = gaussian_diffusion(T=100)
    x0 = torch.tensor([[-1.0, 0.0, 1.0], [127 / 127.5 - 1, 200 / 127.5 - 1, 3 / 127.5 - 1]], dtype=F64)  # bin centres
    sqrt_abar, sqrt_1m = torch.as_tensor(d.tables["sqrt_abar"]), torch.as_tensor(d.tables["sqrt_one_minus_abar"])
    oracle = lambda x, t, c: (x - sqrt_abar[t, None] * x0) / sqrt_1m[t, None]  # noqa: E731
    out = d.calc_bpd_loop(oracle, x0, generator=torch.Generator().manual_seed(0))
    assert out["vb"].shape == (2, 100) and out["vb"][:, 1:].abs().max() < 1e-8
    sigma = math.sqrt(d.tables["posterior_variance"][1])
    cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    interior = -math.log2(cdf(1 / 255 / sigma) - cdf(-1 / 255 / sigma))
    edge = -math.log2(cdf(1 / 255 / sigma))  # the edge bins extend to infinity
    decoder = torch.tensor([(2 * edge + interior) / 3, interior], dtype=F64)
    torch.testing.assert_close(out["vb"][:, 0], decoder, rtol=1e-10, atol=0)  # the exact CDF's precision
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1))


# ------------------------------------------------------------------ respacing and timestep samplers


def test_space_timesteps() -> None:
    keep = space_timesteps(1000, "10,10,3")
    assert len(keep) == 23 and min(keep) == 0 and max(keep) == 999
    assert sorted(keep)[20:] == [667, 833, 999]  # 3 steps over the last section [667, 1000)
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert space_timesteps(1000, 50) == space_timesteps(1000, [50]) == space_timesteps(1000, "50")
    assert len(space_timesteps(1000, 50)) == 50 and {0, 999} <= space_timesteps(1000, 50)
    with pytest.raises(ValueError, match="cannot take 400 steps out of a section of 334 timesteps"):
        space_timesteps(1000, "400,10,10")
    with pytest.raises(ValueError, match="cannot take exactly 999 evenly strided steps out of 1000"):
        space_timesteps(1000, "ddim999")


def test_glides_fast27_grid_moves_its_noisiest_step_down_two() -> None:
    """glide-text2im's respace.py: "10,10,3,2,2" over five 200-step sections, then T - 3 in place of T - 1."""
    keep = space_timesteps(1000, "fast27")
    assert len(keep) == 27 and 999 not in keep and keep - {997} == space_timesteps(1000, "10,10,3,2,2") - {999}
    assert sorted(keep)[-4:] == [600, 799, 800, 997]  # two steps in each of the last two sections
    sampler = AncestralSampler(SamplerConfig(steps="fast27"))
    proc = sampler.respaced(gaussian_diffusion(100))
    assert sampler.nfe() == proc.num_timesteps == 27 and proc.timestep_map.tolist()[-1] == 97


def test_respacing_keeps_abar_and_original_indices() -> None:
    d = gaussian_diffusion(schedule="cosine", var=ModelVarType.FIXED_LARGE)
    keep = sorted(space_timesteps(1000, "10,10,3"))
    r = d.respace(keep)
    abar = d.tables["abar"][keep]
    np.testing.assert_allclose(r.tables["abar"], abar, rtol=1e-9)  # a product of 23 factors vs of 1000
    np.testing.assert_allclose(r.tables["betas"], 1 - abar / np.append(1, abar[:-1]), rtol=1e-12)
    assert r.timestep_map.tolist() == keep and r.model_t(torch.tensor([0, 22])).tolist() == [0, 999]
    rr = r.respace([0, 5, 22])  # respacing a respaced process keeps ORIGINAL indices
    assert rr.timestep_map.tolist() == [keep[0], keep[5], keep[22]]
    np.testing.assert_allclose(
        rr.tables["abar"], abar[[0, 5, 22]], rtol=1e-9, atol=1e-15
    )  # 1 - b near 1e-9 keeps ~1e-16 absolute
    seen = []
    rr.wrap(lambda x, t, c: seen.append(t.tolist()))(None, torch.tensor([2, 1]), None)
    assert seen == [[999, keep[5]]]
    with pytest.raises(ValueError, match=r"respacing needs timesteps in \[0, 23\)"):
        r.respace([5, 23])


def test_loss_aware_sampler_weights() -> None:
    s = LossAwareSampler(4)
    t, w = s.sample(6, torch.device("cpu"))
    assert torch.equal(w, torch.ones(6))  # uniform until the history is full
    for _ in range(12):  # more than 10: the oldest losses roll out
        s.update_with_local_losses(torch.arange(4), torch.tensor([9.0, 9.0, 9.0, 9.0]))
    for _ in range(10):
        s.update_with_local_losses(torch.arange(4), torch.tensor([1.0, 2.0, 3.0, 4.0]))
    p = s.weights()
    want = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=F64) / 10 * 0.999 + 0.001 / 4
    torch.testing.assert_close(p, want)
    t, w = s.sample(1000, torch.device("cpu"))
    torch.testing.assert_close(w, (1 / (4 * want[t])).float())  # importance weights keep the loss unbiased
    t, w = UniformSampler(7).sample(5, torch.device("cpu"))
    assert t.max() < 7 and torch.equal(w, torch.ones(5))


# --------------------------------------------------------------------------- an upsampler's low-res blur


def test_gaussian_blur_against_the_separable_kernel() -> None:
    from genzoo.diffusion.decoder import gaussian_blur

    x = torch.zeros(2, 3, 15, 15, dtype=F64)
    x[:, :, 7, 7] = 1.0  # an impulse in the middle: the output is the 2-D kernel itself
    sigma = torch.tensor([0.6, 1.5], dtype=F64)
    y = gaussian_blur(x, sigma, radius=5)
    for i, s in enumerate(sigma.tolist()):
        k1 = torch.exp(-(torch.arange(-5.0, 6.0, dtype=F64) ** 2) / (2 * s * s))
        k1 = k1 / k1.sum()
        torch.testing.assert_close(y[i, 1, 2:13, 2:13], torch.outer(k1, k1))
    assert torch.allclose(y.sum((2, 3)), torch.ones(2, 3, dtype=F64))  # mass kept
    flat = torch.full((2, 3, 6, 6), 0.3, dtype=F64)
    torch.testing.assert_close(gaussian_blur(flat, sigma, radius=4), flat)  # replicated edges: a constant stays
    noise = torch.randn(2, 3, 6, 6, dtype=F64)
    torch.testing.assert_close(gaussian_blur(noise, torch.zeros(2, dtype=F64), radius=2), noise)  # std 0: identity


def test_an_upsampler_sees_a_blurred_low_res_image_in_training_only() -> None:
    from genzoo.diffusion.decoder import DiffusionDecoder, gaussian_blur
    from genzoo.diffusion.samplers import DDIMConfig, DDIMSampler

    seen = []

    def net(x, t, cond):
        seen.append(cond["low_res"])
        return torch.zeros_like(x)

    d = gaussian_diffusion(T=10, schedule="cosine")
    dec = DiffusionDecoder(
        denoiser=net,
        diffusion=d,
        shape=(3, 8, 8),
        cond_drop=0.0,
        timestep_sampler=UniformSampler(10),
        low_res_blur=(0.5, 0.5),
    )
    low = torch.randn(2, 3, 4, 4)
    dec.training_losses(torch.zeros(2, 3, 8, 8), {"low_res": low})
    torch.testing.assert_close(seen[-1], gaussian_blur(low, torch.full((2,), 0.5), radius=2))
    dec.decode(torch.zeros(2, 3, 8, 8), {"low_res": low}, sampler=DDIMSampler(DDIMConfig(steps=2)))
    assert torch.equal(seen[-1], low)  # sampling conditions on the base model's output as it is
