"""GAN, AE, DAE, VAE and VQ-VAE: each learns in a few hundred CPU steps, measurably; swaps and errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import build, train

from genzoo import api
from genzoo.errors import GenzooError
from genzoo.eval.metrics import fd
from genzoo.nn.quantize import VectorQuantizer
from genzoo.priors import FittedGaussian, FittedGaussianConfig, GaussianMixturePrior, GMMConfig


def test_ae_reconstructs_test_digits_and_samples_from_both_fitted_priors(tmp_path: Path) -> None:
    model, source, _ = train(tmp_path, "ae-digits", ["train.steps=300"])
    x = source.split("test").tensors()["image"]
    mse = torch.mean((model.reconstruct(x) - x) ** 2).item()
    baseline = torch.mean((x - x.mean(0)) ** 2).item()  # predicting the mean image
    assert mse < 0.15 * baseline, (mse, baseline)  # measured 0.074
    for prior in ("gmm", "fitted-gaussian"):
        m = api.load_model(tmp_path, prior=prior)
        assert bool(m.components["prior"].fitted)
        s = m.sample(256, generator=torch.Generator().manual_seed(0))
        assert s.shape == (256, 1, 8, 8)
        # the fitted prior puts samples in the data's region: much nearer than N(0, I) latents decode to
        noise = m.components["decoder"].decode(torch.randn(256, 16, generator=torch.Generator().manual_seed(1)))
        assert fd(x.flatten(1), s.flatten(1)) < fd(x.flatten(1), noise.flatten(1))


@pytest.mark.parametrize("corruption", ["gaussian", "mask"])
def test_denoising_ae_removes_the_corruption(tmp_path: Path, corruption: str) -> None:
    model, source, _ = train(tmp_path, "ae-digits", ["train.steps=300", f"pipeline.corruption={corruption}"])
    x = source.split("test").tensors()["image"]
    torch.manual_seed(1)
    noisy = model.corrupt(x)
    denoised = model.reconstruct(noisy)
    assert torch.mean((denoised - x) ** 2) < 0.5 * torch.mean((noisy - x) ** 2)


def test_vae_elbo_improves_and_the_importance_weighted_bound_is_tighter(tmp_path: Path) -> None:
    resolved = api.resolve_recipe("vae-digits")
    source = api.build_data(resolved)
    x = source.split("test").tensors()["image"][:128]
    torch.manual_seed(0)
    init = api.create_model(resolved, data_spec=source.spec).eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    before = init.nll_bpd(x, k=1, generator=g())["elbo_bpd"].mean().item()
    model, _, _ = train(tmp_path, "vae-digits", ["train.steps=400", "pipeline.kl_warmup_steps=100"])
    after = model.nll_bpd(x, k=32, generator=g())
    elbo, iw = after["elbo_bpd"].mean().item(), after["iw_bpd"].mean().item()
    assert elbo < before - 2.0, (before, elbo)  # bits/dim
    assert iw < elbo  # log-mean-exp of K weights >= their mean (Jensen), so the bound is tighter
    assert elbo < 8.0  # below the 8 bits/dim of a uniform distribution over pixel values


def test_vqvae_uses_its_codebook_and_the_gpt_prior_beats_uniform(tmp_path: Path) -> None:
    model, source, _ = train(tmp_path, "vqvae-digits", ["train.stages={tokenizer: 300, prior: 300}", "train.lr=2e-3"])
    x = source.split("test").tensors()["image"]
    usage = model.codebook_usage(x)
    assert usage["perplexity"] > 16 and usage["used_fraction"] > 0.5, usage  # of 64 codes
    baseline = torch.mean((x - x.mean(0)) ** 2).item()
    assert torch.mean((model.reconstruct(x) - x) ** 2).item() < 0.25 * baseline
    codes = model.components["decoder"].encode_codes(x)
    nll = model.components["prior"].eval().training_losses(codes)["nll"].item()
    assert nll < math.log(64) - 1.0, nll  # nats per code; uniform is log K (measured 2.26 vs 4.16)
    # swaps: the uniform prior (no weights) and token-sampler settings
    for kw in ({"prior": "uniform-tokens"}, {"temperature": 0.5, "top_k": 5}, {"top_p": 0.9}):
        m = api.load_model(tmp_path, **kw)
        s = m.sample(4, generator=torch.Generator().manual_seed(0))
        assert s.shape == (4, 1, 8, 8) and torch.isfinite(s).all()
    assert api.load_model(tmp_path, temperature=0.5).components["prior_sampler"].cfg.temperature == 0.5
    from genzoo.cli import main

    assert (
        main(
            [
                "sample",
                str(tmp_path),
                "-n",
                "2",
                "--out",
                str(tmp_path / "g.png"),
                "--temperature",
                "0.7",
                "--top-k",
                "8",
                "--top-p",
                "0.95",
            ]
        )
        == 0
        and (tmp_path / "g.png").exists()
    )


def test_class_conditional_code_prior_with_logit_cfg(tmp_path: Path) -> None:
    sets = [
        "train.stages={tokenizer: 2, prior: 3}",
        "train.batch_size=8",
        "data.num_train=64",
        "data.image_size=16",
        "prior.layers=1",
        "prior.width=32",
        "decoder.codebook_size=16",
        "decoder.encoder.channels=8",
        "decoder.decoder.channels=8",
    ]
    model, _, _ = train(tmp_path, "cvqvae-shapes", sets)
    prior = model.components["prior"]
    assert prior.needs_condition == {"y"} and model.stages == ("tokenizer", "prior")
    y = torch.tensor([3, 7])
    null = prior._prefix({"y": y, "drop": torch.tensor([True, True])}, 2)
    assert torch.equal(null, prior._prefix(None, 2))  # a dropped class is the unconditional start vector
    assert not torch.equal(prior._prefix({"y": y}, 2), null)
    x = model.sample(2, {"y": y}, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
    m = api.load_model(tmp_path, guidance=None, sets=["prior_guidance.scale=1.0"])
    assert m.components["prior_guidance"].scale == 1.0


def test_gan_samples_move_toward_the_data(tmp_path: Path) -> None:
    torch.manual_seed(0)
    init, source, _ = build("gan-digits")
    x = source.split("train").tensors()["image"][:1000].flatten(1)
    init.eval()
    before = fd(x, init.sample(1000, generator=torch.Generator().manual_seed(0)).flatten(1))
    model, _, _ = train(tmp_path, "gan-digits", ["train.steps=300"])
    after = fd(x, model.sample(1000, generator=torch.Generator().manual_seed(0)).flatten(1))
    assert after < 0.2 * before, (before, after)  # pixel-space Fréchet distance (measured 44.9 -> 1.5)


def test_conditional_gan_and_errors(tmp_path: Path) -> None:
    model, _, _ = train(
        tmp_path,
        "cgan-shapes",
        [
            "train.steps=2",
            "train.batch_size=8",
            "data.num_train=64",
            "data.image_size=16",
            "decoder.network.channels=8",
            "pipeline.discriminator.channels=8",
        ],
    )
    z = torch.randn(2, 100)
    dec = model.components["decoder"]
    assert not torch.allclose(dec.decode(z, {"y": torch.tensor([0, 0])}), dec.decode(z, {"y": torch.tensor([5, 5])}))
    with pytest.raises(GenzooError, match="decoder.class_conditional"):
        build("gan-digits", ["pipeline.condition=class"])
    ae = build("ae-digits")[0]
    with pytest.raises(GenzooError, match="unconditional; drop --class"):
        ae.sample(2, {"y": torch.tensor([1, 1])})


def test_unfitted_prior_says_how_to_fix_it() -> None:
    prior = FittedGaussian(FittedGaussianConfig(shape=[4]))
    with pytest.raises(GenzooError, match="has not been fitted"):
        prior.sample(2)


# --------------------------------------------------------------------------- closed form


def test_gmm_prior_recovers_a_known_mixture() -> None:
    g = torch.Generator().manual_seed(0)
    means = torch.tensor([[-4.0, 0.0], [4.0, 1.0], [0.0, 6.0]])
    weights = torch.tensor([0.5, 0.3, 0.2])
    comp = torch.multinomial(weights, 6000, replacement=True, generator=g)
    z = means[comp] + torch.randn(6000, 2, generator=g) * torch.tensor([[1.0, 0.5]])
    prior = GaussianMixturePrior(GMMConfig(shape=[2], components=3, iterations=50))
    prior.fit(z)
    order = prior.means[:, 0].argsort()
    assert torch.allclose(prior.means[order], means[[0, 2, 1]], atol=0.1)
    assert torch.allclose(prior.log_weights.exp()[order], weights[[0, 2, 1]], atol=0.03)
    cov = prior.scale_trils[order[0]] @ prior.scale_trils[order[0]].t()
    assert torch.allclose(cov, torch.diag(torch.tensor([1.0, 0.25])), atol=0.08)
    s = prior.sample(6000, generator=g)
    assert torch.allclose(s.mean(0), z.mean(0), atol=0.15)


def test_fitted_gaussian_matches_the_latent_moments() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.3, 0.2]])
    z = torch.randn(20000, 3, generator=g) @ a.t() + torch.tensor([1.0, -2.0, 0.5])
    prior = FittedGaussian(FittedGaussianConfig(shape=[3], jitter=0.0))
    prior.fit(z)
    s = prior.sample(20000, generator=g)
    assert torch.allclose(s.mean(0), z.mean(0), atol=0.03)
    assert torch.allclose(torch.cov(s.t()), a @ a.t(), atol=0.05)


def test_vector_quantizer_terms_straight_through_and_ema() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4, beta=0.25)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    z_q, codes, terms = vq(z)
    e = vq.codebook[codes].permute(0, 3, 1, 2)
    assert torch.allclose(z_q, e, atol=1e-6)  # forward value: the nearest codes
    mse = torch.mean((z - e) ** 2)
    assert torch.allclose(terms["commitment"], 0.25 * mse) and torch.allclose(
        terms["codebook"], mse
    )  # beta on commitment
    (z_q * torch.arange(z_q.numel()).view_as(z_q)).sum().backward()
    assert torch.equal(z.grad, torch.arange(z.numel()).view_as(z).float())  # straight through: identity gradient
    terms["codebook"].backward()
    assert vq.codebook.grad is not None

    ema = VectorQuantizer(2, 1, ema=True, decay=0.5, eps=0.0, restart_threshold=0.0)
    ema.codebook.copy_(torch.tensor([[0.0], [10.0]]))
    ema.embed_sum.copy_(ema.codebook)
    ema.cluster_size.fill_(1.0)
    x = torch.tensor([1.0, 2.0, 9.0]).view(1, 1, 1, 3)
    ema(x)
    # counts 0.5*1 + 0.5*[2, 1] = [1.5, 1]; sums 0.5*[0, 10] + 0.5*[3, 9] = [1.5, 9.5]; codebook = sums / counts
    assert torch.allclose(ema.codebook.flatten(), torch.tensor([1.0, 9.5]))


def test_a_fresh_ema_codebook_leaves_unused_codes_where_they_are() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 2, ema=True, restart_threshold=0.0)
    init = vq.codebook.clone()
    z = init[0].view(1, 2, 1, 1).repeat(1, 1, 2, 2) + 0.01  # every vector nearest code 0
    _, codes, _ = vq(z)
    assert (codes == 0).all()
    torch.testing.assert_close(vq.codebook[1:], init[1:], rtol=1e-3, atol=0)  # was ~1e5 x init: never chosen again
    # code 0: sums 0.99 init + 0.01 * 4 (init + 0.01) over counts 0.99 + 0.01 * 4 = 1.03 (its 4 vectors, 1 pseudo-count)
    torch.testing.assert_close(vq.codebook[0] - init[0], torch.full((2,), 0.01 * 4 * 0.01 / 1.03), rtol=1e-2, atol=0)


def test_quantizer_assigns_and_averages_in_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(64, 8, ema=True, restart_threshold=0.0)
    mean = 17 * torch.nn.functional.normalize(torch.randn(8), dim=0)  # codes and inputs near a point of norm 17: their
    with torch.no_grad():  # distances differ by less than bf16 resolves there, so bf16 picks other codes (~80%)
        vq.codebook.copy_(mean + 0.5 * torch.randn(64, 8))
        vq.embed_sum.copy_(vq.codebook)
    twin = VectorQuantizer(64, 8, ema=True, restart_threshold=0.0)
    twin.load_state_dict(vq.state_dict())
    z = (mean + 0.5 * torch.randn(128, 8)).view(2, 8, 8, 8).permute(0, 3, 1, 2)
    _, want, _ = twin(z)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, got, _ = vq(z)
    assert torch.equal(got, want)
    torch.testing.assert_close(vq.embed_sum, twin.embed_sum)


def test_dead_codes_restart_on_encoder_outputs() -> None:
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 2)
    with torch.no_grad():
        vq.codebook[1:] = 100.0  # far from every input: dead
    z = torch.randn(4, 2, 4, 4)
    for _ in range(100):
        _, codes, terms = vq(z)
    assert codes.unique().numel() > 4 and terms["perplexity"] > 4
    assert vq.codebook.abs().max() < 10  # every restarted code now sits on the data
