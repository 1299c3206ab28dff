"""The diffusion likelihood of ``genzoo eval --metrics nll``: the variational bound (Ho et al. 2020 Eq. 5,
Nichol & Dhariwal 2021 Sec. 2) on Gaussian data with the exact denoiser, where every term has a closed form.

For x0 ~ N(MU, S^2) the denoiser E[x0 | x_t] = MU + k (x_t - sqrt(abar) MU), k = S^2 sqrt(abar) / (abar S^2 + 1 - abar)
is linear, so given x0 the expected KL of each step is a formula; the bound of the 256-bin quantised data must lie
above its exact entropy and close on it as T grows.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import build, gaussian_diffusion, threads

from genzoo.diffusion import GaussianDiffusion, ModelMeanType, ModelVarType

F64 = torch.float64
MU, S = 0.1, 0.2


@pytest.fixture(autouse=True)
def one_thread():
    with threads(1):  # thousands of tiny ops: one thread is faster than waking a second (docs/diffusion.md)
        yield


def process(T: int, var: ModelVarType, schedule: str = "linear", clip_range: float | None = None) -> GaussianDiffusion:
    return gaussian_diffusion(T, schedule, mean=ModelMeanType.START_X, var=var, clip_range=clip_range)


def exact_denoiser(d: GaussianDiffusion):
    """x0_hat = E[x0 | x_t] for x0 ~ N(MU, S^2), the network a START_X process calls (original indices = its own)."""
    abar = torch.as_tensor(d.tables["abar"])

    def model(x, t, cond):
        a = abar[t].view(-1, *([1] * (x.dim() - 1)))
        return MU + S**2 * a.sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * MU)

    return model


def quantise(x: torch.Tensor) -> torch.Tensor:
    """The 256 bin centres of [-1, 1], as image data are."""
    return torch.round((x.clamp(-1, 1) + 1) * 127.5) / 127.5 - 1


def bin_log2_prob(x0: torch.Tensor) -> torch.Tensor:
    """log2 P(bin of x0) under N(MU, S^2) quantised to the 256 bins (the edge bins open): the data's true likelihood."""
    lo = torch.where(x0 < -0.999, -math.inf, x0 - 1 / 255)
    hi = torch.where(x0 > 0.999, math.inf, x0 + 1 / 255)
    n = torch.distributions.Normal(torch.tensor(MU, dtype=F64), torch.tensor(S, dtype=F64))
    return torch.log2(n.cdf(hi) - n.cdf(lo))


@pytest.mark.parametrize("var", [ModelVarType.FIXED_SMALL, ModelVarType.FIXED_LARGE])
def test_prior_and_kl_terms_of_the_bound_are_their_closed_forms(var: ModelVarType) -> None:
    """L_T exactly; each L_{t-1}, averaged over x_t given x0, within 5 standard errors of
    0.5 (log sigma^2 / btilde + btilde / sigma^2 - 1 + c0^2 E[(x0 - x0_hat)^2 | x0] / sigma^2) in bits,
    with E[(x0 - x0_hat)^2 | x0] = (1 - k sqrt(abar))^2 (x0 - MU)^2 + k^2 (1 - abar)."""
    T, n = 100, 3000
    d = process(T, var)
    x0 = torch.tensor([-0.3, -0.1, 0.1, 0.25, 0.5], dtype=F64).repeat(n, 1)
    out = d.calc_bpd_loop(exact_denoiser(d), x0, generator=torch.Generator().manual_seed(0))
    tab = {k: torch.as_tensor(v) for k, v in d.tables.items()}

    a_T = tab["abar"][-1]
    prior = 0.5 * (a_T * x0**2 + (1 - a_T) - 1 - torch.log(1 - a_T)) / math.log(2)
    torch.testing.assert_close(out["prior_bpd"], prior.mean(1), rtol=1e-12, atol=1e-15)

    a = tab["abar"][1:, None]
    k = S**2 * a.sqrt() / (a * S**2 + 1 - a)
    err2 = (1 - k * a.sqrt()) ** 2 * (x0[0] - MU) ** 2 + k**2 * (1 - a)  # (T - 1, D)
    btilde = tab["posterior_variance"][1:, None]
    log_sigma2 = (tab["posterior_log_variance_clipped"] if var is ModelVarType.FIXED_SMALL else tab["log_betas_large"])[
        1:, None
    ]
    c0 = tab["posterior_mean_coef1"][1:, None]
    sigma2 = log_sigma2.exp()
    kl = 0.5 * (log_sigma2 - torch.log(btilde) + btilde / sigma2 - 1 + c0**2 * err2 / sigma2)
    want = kl.mean(1) / math.log(2)  # (T - 1,)
    got, se = out["vb"][:, 1:].mean(0), out["vb"][:, 1:].std(0) / math.sqrt(n)
    z = (got - want) / (se + 1e-15)
    assert z.abs().max() < 5, f"worst step t={int(z.abs().argmax()) + 2}: {got[z.abs().argmax()]} vs {want}"
    torch.testing.assert_close(out["total_bpd"], out["prior_bpd"] + out["vb"].sum(1), rtol=1e-12, atol=0)


def test_bound_lies_above_the_true_nll_and_tightens_as_t_grows() -> None:
    """Quantised Gaussian data: E[bound - (-log2 P(x0))] >= 0 at every T (by more than its standard error: the
    bound is an upper bound on the model's NLL, itself at least the data's), and the gap shrinks as T grows."""
    x0 = quantise(MU + S * torch.randn(1500, 4, dtype=F64, generator=torch.Generator().manual_seed(1)))
    true_bpd = -bin_log2_prob(x0).mean(1)
    gaps = []
    for T in (50, 200, 1000):
        d = process(T, ModelVarType.FIXED_SMALL, clip_range=1.0)
        gap = d.calc_bpd_loop(exact_denoiser(d), x0, generator=torch.Generator().manual_seed(2))["total_bpd"] - true_bpd
        mean, se = float(gap.mean()), float(gap.std() / math.sqrt(len(gap)))
        assert mean > 3 * se, (T, mean, se)
        gaps.append(mean)
    assert gaps[0] > gaps[1] > gaps[2], gaps
    assert gaps[2] < 0.5 * gaps[0], gaps


@pytest.mark.parametrize("var", [ModelVarType.FIXED_SMALL, ModelVarType.LEARNED_RANGE])
def test_the_decoder_term_is_a_distribution_over_the_256_bins(var: ModelVarType) -> None:
    """L_0 of the bound for every bin value of one pixel, the model output and x_1 fixed: 2^-L_0 sums to 1."""
    d = process(100, var, clip_range=1.0)
    x0 = torch.linspace(-1, 1, 256, dtype=F64)[:, None]  # (256 bins, 1 dim)
    x_t, t = torch.full_like(x0, 0.31), torch.zeros(256, dtype=torch.long)
    out = torch.full_like(x0, 0.3)
    if var is ModelVarType.LEARNED_RANGE:  # the variance interpolation v of Improved DDPM Eq. 15
        out = torch.cat([out, torch.full_like(x0, 0.4)], 1)
    nll_bits = d.vb_terms_bpd(out, x0, x_t, t)
    assert float(torch.exp2(-nll_bits).sum()) == pytest.approx(1.0, abs=1e-10)


def test_pipeline_and_metric_answer_nll_through_the_process() -> None:
    """``nll_bpd`` of a diffusion model is its process's ``calc_bpd_loop`` on its denoiser (with the labels of a
    class-conditional one); the ``nll`` metric averages it over the split; a cascade refuses in one line."""
    from genzoo import api
    from genzoo.errors import GenzooError
    from genzoo.eval.evaluate import EvalContext, EvalSettings
    from genzoo.plugins import default_registry

    fn = default_registry().build("metric", {"type": "nll", "images": 6})
    small = [
        "components.decoder.timesteps=50",  # the linear schedule scaled to T = 50 still ends below b = 1
        "components.decoder.denoiser.model_channels=8",
        "components.decoder.denoiser.channel_mult=[1]",
        "components.decoder.denoiser.attention_resolutions=[]",
    ]
    for name in ("ddpm-digits", "cfg-digits"):
        spec = api.resolve_recipe(name, sets=small)
        source = api.build_data(spec)
        torch.manual_seed(0)
        model = api.create_model(spec, data_spec=source.spec).eval()
        for w in model.components["decoder"].denoiser.parameters():  # the output layer starts at zero: wake it
            torch.nn.init.normal_(w, std=0.05)
        test = source.split("test").tensors()
        x, y = test["image"][:6], test["label"][:6]
        figures = fn(EvalContext(model, source, None, EvalSettings(batch_size=4), device=torch.device("cpu")))
        dec, g, want = model.components["decoder"], torch.Generator().manual_seed(0), []
        for lo in (0, 4):  # the metric's batches, one generator through both
            cond = {"y": y[lo : lo + 4]} if name == "cfg-digits" else None
            want.append(dec.diffusion.calc_bpd_loop(dec.denoiser, x[lo : lo + 4], cond=cond, generator=g)["total_bpd"])
        assert figures["vlb_bpd"] == pytest.approx(float(torch.cat(want).mean()), rel=1e-6)
        assert 0 < figures["prior_bpd"] < figures["vlb_bpd"] and figures["decoder_bpd"] > 0
        if name == "cfg-digits":  # the label matters: the bound is of p(x | y)
            a, b = (
                model.nll_bpd(x, {"label": labels}, generator=torch.Generator().manual_seed(0))["vlb_bpd"]
                for labels in (y, (y + 1) % 10)
            )
            assert not torch.allclose(a, b)
    model = build("glide-shapes")[0]
    with pytest.raises(GenzooError, match="cascade's likelihood"):
        model.nll_bpd(torch.zeros(1, 3, 32, 32))
