"""Tests that catch wrong code in genzoo/diffusion/decoder.py (issue 21 item 5, `make mutation`): each pins one piece of
the decoder and its pipeline to a closed form or to the exact arguments it hands on.

The blur against explicit sums over replicated edges; the last-step network per sample; the decoder's training loss
(importance weights, the loss-aware history, the low-res blur, the inpainting input, the three condition dropouts,
each drawn from the global RNG in a fixed order and replayed here); the factory's specs, process and errors; the
pipeline's stages, optimiser groups, per-stage losses, upsampling, likelihood and sampling. Stand-in networks and
processes record what they are given, so nothing here trains or runs a U-Net; the file takes about a second.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tiny import gaussian_diffusion
from torch import nn

import genzoo.diffusion.decoder as decoder_module
from genzoo.data import DataSpec
from genzoo.diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType, get_named_beta_schedule
from genzoo.diffusion.decoder import (
    DiffusionDecoder,
    DiffusionDecoderConfig,
    DiffusionPipeline,
    DiffusionPipelineConfig,
    LastStepDenoiser,
    check_denoiser,
    final_timestep,
    gaussian_blur,
    make_diffusion_decoder,
    make_diffusion_pipeline,
)
from genzoo.diffusion.editing import MaskConditioned, inpaint_input, random_known
from genzoo.diffusion.gaussian_diffusion import LossAwareSampler, UniformSampler
from genzoo.diffusion.schedules import betas_with_float32_abar
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Spec
from genzoo.pipelines import Conditioning

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def process(T: int = 100, var: ModelVarType = ModelVarType.FIXED_SMALL) -> GaussianDiffusion:
    return gaussian_diffusion(T, "cosine", var=var)


def randn(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Const(nn.Module):
    """A network predicting a constant, recording (t, cond) of each call; one parameter, so it has weights."""

    def __init__(self, value: float = 0.0, cfg=None) -> None:
        super().__init__()
        self.w, self.value, self.cfg, self.calls = nn.Parameter(torch.zeros(1)), value, cfg, []

    def forward(self, x, t, cond=None):
        self.calls.append((t.clone(), cond))
        return torch.full_like(x, self.value)


# ------------------------------------------------------------------ gaussian_blur


def blur_by_sums(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    """sum_{a,b} k_a k_b x[clamp(i + a), clamp(j + b)], k the normalised Gaussian cut at ``radius``."""
    k = [math.exp(-(o * o) / (2 * max(sigma, 1e-3) ** 2)) for o in range(-radius, radius + 1)]
    k = [v / sum(k) for v in k]
    h, w = x.shape
    out = torch.zeros_like(x)
    for i in range(h):
        for j in range(w):
            out[i, j] = sum(
                k[a + radius] * k[b + radius] * x[min(max(i + a, 0), h - 1), min(max(j + b, 0), w - 1)]
                for a in range(-radius, radius + 1)
                for b in range(-radius, radius + 1)
            )
    return out


def test_gaussian_blur_is_the_truncated_kernel_over_replicated_edges_per_image() -> None:
    """Each image its own std, each channel alone, a non-square image (H 5, W 4), the kernel cut at the radius."""
    x = randn(2, 2, 5, 4, seed=1)
    sigma = torch.tensor([0.6, 1.7], dtype=F64)
    y = gaussian_blur(x, sigma, radius=2)
    assert y.shape == x.shape and y.dtype == F64
    for b in range(2):
        for c in range(2):
            torch.testing.assert_close(y[b, c], blur_by_sums(x[b, c], float(sigma[b]), 2), rtol=0, atol=1e-14)
    delta = torch.zeros(1, 1, 9, 9, dtype=F64)
    delta[0, 0, 4, 4] = 1
    y = gaussian_blur(delta, torch.tensor([2.0]), radius=3)
    k = torch.exp(-(torch.arange(-3, 4, dtype=F64) ** 2) / 8)
    want = torch.zeros(9, 9, dtype=F64)
    want[1:8, 1:8] = torch.outer(k, k) / k.sum() ** 2
    torch.testing.assert_close(y[0, 0], want, rtol=0, atol=1e-15)
    assert torch.equal(gaussian_blur(x, torch.zeros(2), radius=2), x)  # std 0: the identity, not 0 / 0
    assert gaussian_blur(x.float(), sigma, radius=1).dtype == torch.float32


# ------------------------------------------------------------------ the last-step network


def test_the_last_step_network_serves_exactly_its_timestep_per_sample() -> None:
    first, last = Const(1.0), Const(2.0)
    net = LastStepDenoiser(first, last, t_last=3)
    assert dict(net.named_children()) == {"denoiser": first, "last": last} and net.t_last == 3
    x, cond = torch.zeros(3, 2, 2, 2), {"y": torch.tensor([1, 2, 3])}
    assert torch.equal(net(x, torch.tensor([3, 3, 3]), cond), torch.full_like(x, 2.0))
    assert not first.calls and len(last.calls) == 1 and last.calls[0][1] is cond
    assert torch.equal(net(x, torch.tensor([5, 0, 7]), cond), torch.full_like(x, 1.0))
    assert len(first.calls) == 1 and first.calls[0][1] is cond and len(last.calls) == 1
    out = net(x, torch.tensor([3, 5, 3]), cond)
    assert out[:, 0, 0, 0].tolist() == [2.0, 1.0, 2.0] and torch.equal(out, out[:, :1, :1, :1].expand_as(out))
    assert first.calls[-1][1] is cond and last.calls[-1][1] is cond and len(first.calls) == len(last.calls) == 2


def test_final_timestep_is_the_original_index_of_the_last_model_evaluation() -> None:
    d = process()

    class Grid:
        last_index = 1

        def respaced(self, diffusion):
            return diffusion.respace([10, 30, 60, 99])

    class GridFromZero:
        def respaced(self, diffusion):
            return diffusion.respace([10, 30, 60, 99])

    class Plain:
        pass

    assert final_timestep(Grid(), d) == 30 and final_timestep(GridFromZero(), d) == 10
    assert type(final_timestep(Grid(), d)) is int
    message = r"^a last_step_denoiser needs a sampler with a timestep grid \(ddpm, ddim, \.\.\.\); Plain has none$"
    with pytest.raises(RegistryError, match=message):
        final_timestep(Plain(), d)


# ------------------------------------------------------------------ the decoder


class FixedT:
    """A timestep sampler returning given t and importance weights, recording what it was asked for."""

    def __init__(self, t: torch.Tensor, w: torch.Tensor) -> None:
        self.t, self.w, self.asked = t, w, []

    def sample(self, batch, device):
        self.asked.append((batch, device))
        return self.t, self.w


class Aware(FixedT):
    def __init__(self, t, w) -> None:
        super().__init__(t, w)
        self.updates = []

    def update_with_local_losses(self, t, losses) -> None:
        self.updates.append((t, losses))


class Process:
    """A process whose training_losses returns fixed per-example terms and records its arguments."""

    def __init__(self, terms=None) -> None:
        self.terms, self.calls = terms, []

    def training_losses(self, model, x0, t, *, cond=None):
        self.calls.append((model, x0, t, cond))
        n = len(x0)
        return self.terms or {
            "loss": torch.arange(1.0, n + 1, device=x0.device),
            "mse": torch.ones(n, device=x0.device),
        }

    def respace(self, kept):
        return SimpleNamespace(timestep_map=np.array(sorted(kept)))


def decoder(**kw) -> DiffusionDecoder:
    args = dict(
        denoiser=Const(),
        diffusion=Process(),
        shape=(1, 4, 4),
        cond_drop=0.0,
        timestep_sampler=FixedT(torch.tensor([0, 5, 9]), torch.ones(3)),
    )
    return DiffusionDecoder(**{**args, **kw})


def test_the_decoder_keeps_its_parts() -> None:
    net, proc, ts, last = Const(), Process(), FixedT(None, None), Const()
    dec = DiffusionDecoder(
        denoiser=net,
        diffusion=proc,
        shape=(3, 8, 6),
        cond_drop=0.1,
        emb_drop=0.2,
        context_drop=0.3,
        timestep_sampler=ts,
        needs_condition=frozenset({"y"}),
        low_res_blur=(0.5, 1.0),
        last_denoiser=last,
        inpaint=True,
    )
    assert dec.denoiser is net and dec.diffusion is proc and dec.timestep_sampler is ts and dec.last_denoiser is last
    assert dec.drops == {"drop": 0.1, "drop_emb": 0.2, "drop_context": 0.3}
    assert dec.consumes == Spec(shape=(3, 8, 6)) and dec.produces == Spec(shape=(3, 8, 6))
    assert dec.needs_condition == frozenset({"y"}) and dec.low_res_blur == (0.5, 1.0) and dec.inpaint is True
    assert any(k.startswith("last_denoiser.") for k in dec.state_dict())
    plain = DiffusionDecoder(denoiser=net, diffusion=proc, shape=(1, 2, 2), cond_drop=0.0, timestep_sampler=ts)
    assert not hasattr(plain, "last_denoiser") and list(plain.state_dict()) == ["denoiser.w"]
    assert plain.drops == {"drop": 0.0, "drop_emb": 0.0, "drop_context": 0.0} and plain.needs_condition == frozenset()
    assert plain.low_res_blur is None and plain.inpaint is False


class Recording:
    """A sampler that records its call and has a grid (respaced), so a last-step network can find its timestep."""

    last_index = 1

    def __init__(self) -> None:
        self.calls = []

    def respaced(self, diffusion):
        return diffusion.respace([7, 40, 99])

    def sample(self, diffusion, net, shape, **kw):
        self.calls.append((diffusion, net, shape, kw))
        return torch.zeros(shape)


def test_decode_hands_the_process_the_network_and_the_noise_to_the_sampler() -> None:
    dec = decoder()
    z, cond, g, guidance, sampler = (
        torch.randn(2, 1, 4, 4),
        {"y": torch.tensor([1, 2])},
        torch.Generator(),
        object(),
        Recording(),
    )
    out = dec.decode(z, cond, generator=g, sampler=sampler, guidance=guidance)
    assert out.shape == (2, 1, 4, 4)
    ((diffusion, net, shape, kw),) = sampler.calls
    assert diffusion is dec.diffusion and net is dec.denoiser and shape == (2, 1, 4, 4) and type(shape) is tuple
    assert kw == {"cond": cond, "guidance": guidance, "generator": g, "noise": z, "device": z.device}
    assert kw["cond"] is cond and kw["noise"] is z and kw["generator"] is g and kw["guidance"] is guidance
    with_last = decoder(last_denoiser=Const(1.0))
    with_last.decode(z, None, sampler=sampler)
    net = sampler.calls[1][1]
    assert isinstance(net, LastStepDenoiser) and net.denoiser is with_last.denoiser
    assert net.last is with_last.last_denoiser and net.t_last == 40
    assert sampler.calls[1][3]["cond"] is None and sampler.calls[1][3]["generator"] is None
    message = r"^DiffusionDecoder needs a diffusion sampler; add `sampler: \{type: ddim\}` to the recipe$"
    with pytest.raises(RegistryError, match=message):
        dec.decode(z, cond)


def test_the_training_loss_is_the_importance_weighted_mean_and_feeds_the_loss_aware_history() -> None:
    vlb = torch.tensor([0.5, 0.25, 1.0], requires_grad=True)
    terms = {
        "loss": torch.tensor([1.0, 2.0, 3.0]),
        "mse": torch.tensor([4.0, 5.0, 6.0]),
        "vlb": vlb,
        "note": torch.tensor(7.0),
    }
    t, w = torch.tensor([3, 0, 8]), torch.tensor([1.0, 0.5, 2.0])
    ts, proc = Aware(t, w), Process(terms)
    dec = decoder(diffusion=proc, timestep_sampler=ts)
    x0 = torch.randn(3, 1, 4, 4)
    out = dec.training_losses(x0)
    assert ts.asked == [(3, x0.device)]
    ((model, x, tt, cond),) = proc.calls
    assert model is dec.denoiser and x is x0 and tt is t and cond is None
    assert set(out) == {"loss", "mse", "vlb", "note"} and out["note"] is terms["note"]
    assert out["loss"].item() == pytest.approx(8 / 3, rel=1e-6)
    assert out["mse"].item() == pytest.approx(18.5 / 3, rel=1e-6)
    assert out["vlb"].item() == pytest.approx(2.625 / 3, rel=1e-6)
    ((ut, losses),) = ts.updates
    assert ut is t and torch.equal(losses, vlb.detach()) and not losses.requires_grad
    no_vlb = Aware(t, w)
    decoder(diffusion=Process(), timestep_sampler=no_vlb).training_losses(x0)
    assert no_vlb.updates == []
    assert decoder(diffusion=Process(terms)).training_losses(x0)["loss"].item() == pytest.approx(2.0)


def passed_cond(dec: DiffusionDecoder, x0: torch.Tensor, cond, seed: int):
    torch.manual_seed(seed)
    dec.training_losses(x0, cond)
    return dec.diffusion.calls[-1][3]


def test_condition_dropout_draws_one_mask_per_nonzero_probability_in_order() -> None:
    """drop, drop_emb, drop_context: rand(B) < p each, drawn in that order, only for p > 0 and only with a condition;
    the caller's condition is not changed."""
    x0, y = torch.zeros(64, 1, 2, 2), torch.arange(64)
    t = FixedT(torch.zeros(64, dtype=torch.long), torch.ones(64))
    dec = decoder(timestep_sampler=t, cond_drop=1.0, emb_drop=0.0, context_drop=0.5)
    cond = {"y": y}
    got = passed_cond(dec, x0, cond, seed=0)
    torch.manual_seed(0)
    u_drop, u_context = torch.rand(64), torch.rand(64)
    assert set(got) == {"y", "drop", "drop_context"} and got["y"] is y and cond == {"y": y}
    assert torch.equal(got["drop"], u_drop < 1.0) and got["drop"].all()
    assert torch.equal(got["drop_context"], u_context < 0.5) and 0 < got["drop_context"].sum() < 64
    dec = decoder(timestep_sampler=t, cond_drop=0.0, emb_drop=0.3, context_drop=0.0)
    got = passed_cond(dec, x0, cond, seed=1)
    torch.manual_seed(1)
    assert set(got) == {"y", "drop_emb"} and torch.equal(got["drop_emb"], torch.rand(64) < 0.3)
    assert passed_cond(dec, x0, None, seed=1) is None and passed_cond(dec, x0, {}, seed=1) == {}
    assert passed_cond(decoder(timestep_sampler=t), x0, cond, seed=1) == cond  # no dropout: no masks


def test_an_upsampler_trains_on_a_low_res_image_blurred_by_a_random_std_in_its_range() -> None:
    """sigma = lo + (hi - lo) u per image, u ~ U(0, 1) from the global RNG; the kernel cut at max(1, ceil(3 hi))."""
    x0 = torch.zeros(3, 1, 8, 8)
    low = randn(3, 1, 6, 5, seed=2)
    t = FixedT(torch.zeros(3, dtype=torch.long), torch.ones(3))
    for lo, hi in ((0.5, 1.5), (0.3, 0.3), (0.0, 0.0)):
        dec = decoder(timestep_sampler=t, low_res_blur=(lo, hi))
        got = passed_cond(dec, x0, {"low_res": low, "y": 1}, seed=5)
        torch.manual_seed(5)
        sigma = lo + (hi - lo) * torch.rand(3)
        assert got["y"] == 1 and torch.equal(
            got["low_res"], gaussian_blur(low, sigma, radius=max(1, math.ceil(3 * hi)))
        )
    assert torch.equal(got["low_res"], low)  # std 0
    blurred = passed_cond(decoder(timestep_sampler=t, low_res_blur=(0.3, 0.3)), x0, {"low_res": low}, seed=5)
    assert not torch.equal(blurred["low_res"], gaussian_blur(low, torch.full((3,), 0.3), radius=2))  # radius 1
    assert passed_cond(decoder(timestep_sampler=t), x0, {"low_res": low}, seed=5)["low_res"] is low
    assert passed_cond(decoder(timestep_sampler=t, low_res_blur=(1.0, 2.0)), x0, {"y": 3}, seed=5) == {"y": 3}
    assert passed_cond(decoder(timestep_sampler=t, low_res_blur=(1.0, 2.0)), x0, None, seed=5) is None


def test_the_training_draws_are_made_on_the_data_device() -> None:
    meta = torch.device("meta")
    t = FixedT(torch.zeros(3, dtype=torch.long, device=meta), torch.ones(3, device=meta))
    dec = decoder(timestep_sampler=t, low_res_blur=(0.5, 1.0), cond_drop=0.5, emb_drop=0.5, context_drop=0.5)
    x0 = torch.zeros(3, 1, 4, 4, device=meta)
    got = passed_cond(dec, x0, {"low_res": torch.zeros(3, 1, 2, 2, device=meta)}, seed=0)
    assert {k: v.device for k, v in got.items()} == dict.fromkeys(("low_res", "drop", "drop_emb", "drop_context"), meta)
    assert t.asked == [(3, meta)]


def test_an_inpainting_decoder_trains_on_random_known_regions() -> None:
    """cond["inpaint"] = inpaint_input(x0, random_known(x0)) from the global RNG, with or without a condition."""
    x0 = randn(4, 2, 6, 6, seed=3)
    t = FixedT(torch.zeros(4, dtype=torch.long), torch.ones(4))
    dec = decoder(timestep_sampler=t, inpaint=True)
    for cond in (None, {"y": torch.arange(4)}):
        got = passed_cond(dec, x0, cond, seed=6)
        torch.manual_seed(6)
        want = inpaint_input(x0, random_known(x0))
        assert set(got) == {"inpaint", *(cond or {})} and torch.equal(got["inpaint"], want)
    assert "inpaint" not in passed_cond(decoder(timestep_sampler=t), x0, {"y": 1}, seed=6)


# ------------------------------------------------------------------ the factory


class Networks:
    """A registry stand-in: records each network spec it builds."""

    def __init__(self) -> None:
        self.built = []

    def build(self, kind, spec, *, data, where):
        self.built.append((kind, spec, data, where))
        return Const(float(len(self.built)))


def context(shape=(1, 8, 8), data=True):
    return SimpleNamespace(registry=Networks(), data=DataSpec("digits", shape) if data else None, components={})


WHERE = "decoder 'diffusion-decoder': "


def test_the_factory_builds_the_denoiser_and_the_process_of_its_config() -> None:
    ctx = context()
    cfg = DiffusionDecoderConfig(timesteps=100, denoiser={"type": "unet", "model_channels": 8})
    dec = make_diffusion_decoder(cfg, ctx)
    assert ctx.registry.built == [("network", {"type": "unet", "model_channels": 8}, ctx.data, WHERE + "denoiser: ")]
    assert cfg.denoiser == {"type": "unet", "model_channels": 8}
    d = dec.diffusion
    assert np.array_equal(d.tables["betas"], get_named_beta_schedule("linear", 100))
    assert d.model_mean_type is ModelMeanType.EPSILON and d.model_var_type is ModelVarType.FIXED_LARGE
    assert d.loss_type is LossType.SIMPLE and d.clip_range == 1.0
    assert dec.produces.shape == (1, 8, 8) and dec.consumes.shape == (1, 8, 8)
    assert type(dec.timestep_sampler) is UniformSampler and dec.timestep_sampler.num_timesteps == 100
    assert dec.drops == {"drop": 0.0, "drop_emb": 0.0, "drop_context": 0.0} and dec.low_res_blur is None
    assert dec.inpaint is False and not hasattr(dec, "last_denoiser") and dec.denoiser.value == 1.0


def test_the_factory_with_every_field_set() -> None:
    ctx = context()
    cfg = DiffusionDecoderConfig(
        schedule="cosine",
        timesteps=50,
        mean_type="v",
        var_type="learned-range",
        loss="hybrid",
        timestep_sampler="loss-aware",
        clip_range=None,
        cond_drop=0.1,
        emb_drop=0.2,
        context_drop=0.3,
        image_size=4,
        low_res_blur=(0.5, 1.0),
        denoiser={"type": "unet"},
        last_step_denoiser={"type": "mlp-denoiser"},
    )
    dec = make_diffusion_decoder(cfg, ctx)
    (_, spec, data, where), (_, last_spec, last_data, last_where) = ctx.registry.built
    assert spec == {"type": "unet", "image_size": 4, "learn_sigma": True} and where == WHERE + "denoiser: "
    assert last_spec == {"type": "mlp-denoiser", "image_size": 4, "learn_sigma": True}
    assert last_where == WHERE + "last_step_denoiser: " and data is ctx.data and last_data is ctx.data
    assert cfg.denoiser == {"type": "unet"} and cfg.last_step_denoiser == {"type": "mlp-denoiser"}
    assert dec.denoiser.value == 1.0 and dec.last_denoiser.value == 2.0
    d = dec.diffusion
    assert np.array_equal(d.tables["betas"], get_named_beta_schedule("cosine", 50))
    assert d.model_mean_type is ModelMeanType.VELOCITY and d.model_var_type is ModelVarType.LEARNED_RANGE
    assert d.loss_type is LossType.HYBRID and d.clip_range is None
    assert dec.produces.shape == (1, 4, 4) and dec.low_res_blur == (0.5, 1.0)
    assert type(dec.timestep_sampler) is LossAwareSampler and dec.timestep_sampler.num_timesteps == 50
    assert dec.drops == {"drop": 0.1, "drop_emb": 0.2, "drop_context": 0.3}
    ctx = context()
    given = DiffusionDecoderConfig(
        image_size=4, denoiser={"type": "unet", "image_size": 6}, last_step_denoiser={"type": "m", "image_size": 2}
    )
    assert make_diffusion_decoder(given, ctx).produces.shape == (1, 4, 4)
    assert [b[1] for b in ctx.registry.built] == [{"type": "unet", "image_size": 6}, {"type": "m", "image_size": 2}]
    ctx = context()
    make_diffusion_decoder(DiffusionDecoderConfig(denoiser={"type": "u"}, last_step_denoiser={"type": "m"}), ctx)
    assert [b[1] for b in ctx.registry.built] == [{"type": "u"}, {"type": "m"}]  # no image_size: the dataset's


def test_the_factory_schedules_from_explicit_betas_and_float32_abar() -> None:
    betas = [0.1, 0.2, 0.3, 0.4]
    for cfg, want in (
        (DiffusionDecoderConfig(timesteps=4, betas=betas), np.asarray(betas)),
        (DiffusionDecoderConfig(timesteps=4, betas=betas, abar_float32=True), betas_with_float32_abar("x", 4, betas)),
        (DiffusionDecoderConfig(timesteps=30, abar_float32=True), betas_with_float32_abar("linear", 30)),
        (
            DiffusionDecoderConfig(timesteps=30, schedule="cosine", abar_float32=True),
            betas_with_float32_abar("cosine", 30),
        ),
    ):
        got = make_diffusion_decoder(cfg, context()).diffusion.tables["betas"]
        assert got.dtype == np.float64 and np.array_equal(got, want), cfg
    assert not np.array_equal(betas_with_float32_abar("x", 4, betas), np.asarray(betas))


def test_the_factory_refuses_a_contradicting_learn_sigma_and_a_missing_dataset() -> None:
    for learn, var in ((True, "fixed-large"), (False, "learned-range")):
        cfg = DiffusionDecoderConfig(var_type=var, loss="hybrid", denoiser={"type": "unet", "learn_sigma": learn})
        message = (
            rf"^decoder 'diffusion-decoder': denoiser.learn_sigma is {learn} but var_type is {var}; leave learn_sigma "
            r"unset \(null\) and the var_type decides$"
        )
        with pytest.raises(RegistryError, match=message):
            make_diffusion_decoder(cfg, context())
    ctx = context()
    cfg = DiffusionDecoderConfig(var_type="learned-range", loss="hybrid", denoiser={"type": "u", "learn_sigma": True})
    make_diffusion_decoder(cfg, ctx)
    make_diffusion_decoder(DiffusionDecoderConfig(denoiser={"type": "u", "learn_sigma": None}), ctx)
    assert [b[1] for b in ctx.registry.built] == [
        {"type": "u", "learn_sigma": True},
        {"type": "u", "learn_sigma": None},
    ]
    with pytest.raises(RegistryError, match=r"^decoder 'diffusion-decoder' needs a dataset to size its denoiser$"):
        make_diffusion_decoder(DiffusionDecoderConfig(), context(data=False))


def test_an_inpainting_factory_widens_both_networks_and_wraps_them() -> None:
    """in_channels 2 C + 1 (image, known pixels, mask); out_channels C, or 2 C with a learned variance."""
    for var, out in (("fixed-large", 3), ("learned-range", 6)):
        ctx = context(shape=(3, 8, 8))
        cfg = DiffusionDecoderConfig(
            var_type=var, loss="hybrid", inpaint=True, denoiser={"type": "u"}, last_step_denoiser={"type": "m"}
        )
        dec = make_diffusion_decoder(cfg, ctx)
        (_, spec, _, where), (_, last, _, last_where) = ctx.registry.built
        assert spec["in_channels"] == 7 and spec["out_channels"] == out and last["in_channels"] == 7
        assert (
            last["out_channels"] == out
            and where == WHERE + "denoiser: "
            and last_where == WHERE + "last_step_denoiser: "
        )
        assert isinstance(dec.denoiser, MaskConditioned) and isinstance(dec.last_denoiser, MaskConditioned)
        assert dec.denoiser.net.value == 1.0 and dec.last_denoiser.net.value == 2.0 and dec.inpaint is True
    with pytest.raises(GenzooError, match=r"^decoder 'diffusion-decoder': denoiser: inpaint adds the known image"):
        make_diffusion_decoder(
            DiffusionDecoderConfig(inpaint=True, denoiser={"type": "u", "in_channels": 4}), context()
        )


# ------------------------------------------------------------------ the pipeline


class Stage(nn.Module):
    """A decoder (or upsampler, guidance, CLIP, encoder) stand-in that records its calls."""

    def __init__(self, size: int = 4, params: int = 1, frozen: int = 0) -> None:
        super().__init__()
        self.produces = Spec(shape=(1, size, size))
        self.ps = nn.ParameterList([nn.Parameter(torch.zeros(1)) for _ in range(params)])
        self.frozen = nn.ParameterList([nn.Parameter(torch.zeros(1), requires_grad=False) for _ in range(frozen)])
        self.diffusion, self.denoiser, self.calls, self.noised = SimpleNamespace(), Const(), [], True

    def training_losses(self, *args):
        self.calls.append(("training_losses", args))
        return {"loss": torch.tensor(float(len(self.calls)))}

    def decode(self, z, cond, **kw):
        self.calls.append(("decode", z, cond, kw))
        return z + 5

    def tokenize(self, captions):
        return torch.tensor([len(c) for c in captions])

    def encode(self, condition):
        return {"context": self.tokenize(condition["caption"]).float()}


class Guide:
    """A guidance without weights or a training loss (CFG)."""


class Unweighted(nn.Module):
    """A guidance with a training loss but no weights."""

    def training_losses(self, *args):
        raise AssertionError("not trained")


def pipeline(condition=Conditioning.none, **components) -> DiffusionPipeline:
    return DiffusionPipeline({"decoder": Stage(), **components}, condition=condition, num_classes=3)


def test_the_pipeline_stages_are_those_its_components_need() -> None:
    assert pipeline().stages == ("decoder",) and pipeline().base_size == 4 and pipeline().upsampler is None
    up = Stage(8)
    assert (
        pipeline(upsampler_decoder=up).stages == ("decoder", "upsampler")
        and pipeline(upsampler_decoder=up).upsampler is up
    )
    assert pipeline(clip=Stage()).stages == ("decoder", "clip") and pipeline(clip=None).stages == ("decoder",)
    assert pipeline(guidance=Stage()).stages == ("decoder", "guidance")
    assert pipeline(guidance=Unweighted()).stages == ("decoder",)  # a training loss but no weights
    assert pipeline(guidance=Guide()).stages == ("decoder",)
    everything = pipeline(upsampler_decoder=Stage(8), clip=Stage(), guidance=Stage())
    assert everything.stages == ("decoder", "upsampler", "clip", "guidance")
    assert DiffusionPipeline({"decoder": Stage(6)}, condition=Conditioning.none, num_classes=None).base_size == 6


def test_the_pipeline_low_res_view_is_the_area_downsample() -> None:
    p = pipeline()
    x = randn(2, 1, 8, 8, seed=4)
    want = x.view(2, 1, 4, 2, 4, 2).mean((3, 5))
    torch.testing.assert_close(p.low_res(x), want, rtol=0, atol=1e-15)
    small = randn(2, 1, 4, 4)
    assert p.low_res(small) is small


def test_each_stage_optimises_its_own_trainable_weights() -> None:
    dec, enc, up, clip, guide = Stage(params=2, frozen=1), Stage(params=1, frozen=2), Stage(8), Stage(), Stage(params=3)
    p = DiffusionPipeline(
        {"decoder": dec, "encoder": enc, "upsampler_decoder": up, "clip": clip, "guidance": guide},
        condition=Conditioning.none,
        num_classes=None,
    )

    def ids(params):
        return [id(q) for q in params]

    groups = {stage: p.optimizer_groups(stage) for stage in ("decoder", "upsampler", "clip", "guidance")}
    assert all(list(g) == ["main"] for g in groups.values())
    assert ids(groups["decoder"]["main"]) == ids(
        [*dec.ps, *dec.denoiser.parameters(), *enc.ps, *enc.denoiser.parameters()]
    )
    assert ids(groups["upsampler"]["main"]) == ids([*up.ps, *up.denoiser.parameters()])
    assert ids(groups["clip"]["main"]) == ids([*clip.ps, *clip.denoiser.parameters()])
    assert ids(groups["guidance"]["main"]) == ids([*guide.ps, *guide.denoiser.parameters()])
    assert ids(pipeline(guidance=Guide()).optimizer_groups("guidance")["main"]) == []
    alone = pipeline()
    assert ids(alone.optimizer_groups()["main"]) == ids(alone.components["decoder"].parameters())


def test_each_stage_trains_on_its_own_inputs(monkeypatch) -> None:
    """decoder: the low-res images and the encoded condition; upsampler: full size with the low-res view as
    cond["low_res"]; clip and guidance: the low-res images, the caption's tokens (not encoded), the decoder's
    process."""
    seen = []
    monkeypatch.setattr(decoder_module, "noised_clip_losses", lambda *args: seen.append(args) or {"loss": 0})
    dec, up, guide, clip, enc = Stage(), Stage(8), Stage(), Stage(), Stage()
    p = DiffusionPipeline(
        {"decoder": dec, "upsampler_decoder": up, "guidance": guide, "clip": clip, "encoder": enc},
        condition=Conditioning.caption,
        num_classes=None,
    )
    x = randn(2, 1, 8, 8, seed=5)
    batch = {"image": x, "caption": ["a", "bcd"]}
    low = p.low_res(x)
    assert p.training_losses(batch)["loss"] == 1.0
    ((_, (x0, cond)),) = dec.calls
    assert torch.equal(x0, low) and torch.equal(cond["context"], torch.tensor([1.0, 3.0]))
    p.training_losses(batch, stage="upsampler")
    ((_, (x0, cond)),) = up.calls
    assert x0 is x and set(cond) == {"low_res"} and torch.equal(cond["low_res"], low)
    p.training_losses(batch, optimizer="main", stage="guidance")
    ((_, (x0, cond, diffusion)),) = guide.calls
    assert torch.equal(x0, low) and torch.equal(cond["tokens"], torch.tensor([1, 3])) and diffusion is dec.diffusion
    assert p.training_losses(batch, stage="clip") == {"loss": 0}
    ((c, x0, cond, diffusion),) = seen
    assert c is clip and torch.equal(x0, low) and torch.equal(cond["tokens"], torch.tensor([1, 3]))
    assert set(cond) == {"tokens"} and diffusion is dec.diffusion
    # an upsampler that reads the condition (GLIDE's, guided-diffusion's) gets the encoded caption, not grads of it
    enc.encode = lambda c: {"context": enc.ps[0] + enc.tokenize(c["caption"]).float()}  # differentiable
    reads = DiffusionPipeline(
        {"decoder": dec, "upsampler_decoder": up, "encoder": enc},
        condition=Conditioning.caption,
        num_classes=None,
        upsampler_condition=True,
    )
    reads.training_losses(batch, stage="upsampler")
    (x0, cond) = up.calls[-1][1]
    assert x0 is x and set(cond) == {"low_res", "context"} and torch.equal(cond["context"], torch.tensor([1.0, 3.0]))
    assert not cond["context"].requires_grad and reads.condition_of(batch)["context"].requires_grad
    assert torch.equal(cond["low_res"], low)


def test_upsample_draws_its_noise_from_the_generator_and_uses_the_upsampler_sampler() -> None:
    up, sampler = Stage(8), object()
    p = pipeline(upsampler_decoder=up, upsampler_sampler=sampler)
    low = randn(3, 1, 4, 4, seed=6).float()
    out = p.upsample(low, generator=torch.Generator().manual_seed(7))
    ((_, z, cond, kw),) = up.calls
    assert torch.equal(z, torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7)))
    assert z.dtype == torch.float32 and cond.keys() == {"low_res"} and cond["low_res"] is low
    assert kw["sampler"] is sampler and kw["guidance"] is None and torch.equal(out, z + 5)
    assert set(kw) == {"generator", "sampler", "guidance"}
    noise = torch.ones(3, 1, 8, 8)
    g = torch.Generator()
    p.upsample(low, generator=g, noise=noise)
    assert up.calls[1][1] is noise and up.calls[1][3]["generator"] is g
    assert pipeline(upsampler_decoder=Stage(8)).upsample(low, noise=noise).shape == (3, 1, 8, 8)
    # the upsampler's own guidance; the condition reaches it only when it reads one, encoded as the base's is
    guide, enc = object(), Stage()
    parts = {"decoder": Stage(), "upsampler_decoder": up, "upsampler_sampler": sampler, "upsampler_guidance": guide}
    for reads in (False, True):
        p = DiffusionPipeline(
            {**parts, "encoder": enc}, condition=Conditioning.caption, num_classes=None, upsampler_condition=reads
        )
        p.upsample(low, {"caption": ["ab", "c", "def"]}, noise=noise)
        _, _, cond, kw = up.calls[-1]
        assert kw["guidance"] is guide and cond["low_res"] is low
        assert set(cond) == ({"low_res", "context"} if reads else {"low_res"})
    assert torch.equal(cond["context"], torch.tensor([2.0, 1.0, 3.0]))
    # sampling hands the user's condition on to the upsampler, a class model's default included
    prior = SimpleNamespace(sample=lambda n, cond, **kw: torch.zeros(n, 1, 4, 4))
    p = DiffusionPipeline(
        {**parts, "prior": prior}, condition=Conditioning.class_, num_classes=3, upsampler_condition=True
    )
    p.sample(4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(up.calls[-1][2]["y"], torch.tensor([0, 1, 2, 0]))
    assert torch.equal(up.calls[-1][2]["low_res"], torch.ones(4, 1, 4, 4))  # the base's z + 5, clamped
    # OpenAI's cascades hand the upsampler 8-bit images: rounded to the 256 levels of [-1, 1]
    z = torch.linspace(-6.2, -3.9, 64).view(4, 1, 4, 4)
    prior.sample = lambda n, cond, **kw: z
    want = (z + 5).clamp(-1, 1)  # the stand-in decoder's z + 5
    for quantize in (False, True):
        parts_q = {**parts, "prior": prior}
        p = DiffusionPipeline(parts_q, condition=Conditioning.none, num_classes=None, quantize_low_res=quantize)
        p.sample(4)
        low = up.calls[-1][2]["low_res"]
        assert torch.equal(low, ((want + 1) * 127.5).round() / 127.5 - 1 if quantize else want)
        on_levels = torch.allclose((low + 1) * 127.5, ((low + 1) * 127.5).round(), atol=1e-4)
        assert on_levels == quantize and low.min() == -1 and low.max() == 1


def test_the_likelihood_is_the_bound_of_the_decoder_and_refused_for_a_cascade() -> None:
    seen = []
    out = {
        "total_bpd": torch.tensor([3.0, 4.0]),
        "prior_bpd": torch.tensor([0.1, 0.2]),
        "vb": torch.arange(6.0).view(2, 3),
    }
    p = pipeline(condition=Conditioning.class_)
    dec = p.components["decoder"]
    dec.diffusion.calc_bpd_loop = lambda model, x, *, cond, generator: seen.append((model, x, cond, generator)) or out
    x, g = torch.zeros(2, 1, 4, 4), torch.Generator()
    got = p.nll_bpd(x, {"label": torch.tensor([2, 0])}, generator=g)
    assert set(got) == {"vlb_bpd", "prior_bpd", "decoder_bpd"} and got["vlb_bpd"] is out["total_bpd"]
    assert got["prior_bpd"] is out["prior_bpd"] and torch.equal(got["decoder_bpd"], torch.tensor([0.0, 3.0]))
    ((model, xx, cond, gen),) = seen
    assert model is dec.denoiser and xx is x and torch.equal(cond["y"], torch.tensor([2, 0])) and gen is g
    q = pipeline()
    q.components["decoder"].diffusion.calc_bpd_loop = lambda model, x, *, cond, generator: seen.append(cond) or out
    q.nll_bpd(x)
    assert seen[-1] is None
    message = r"^metric 'nll': a cascade's likelihood needs its upsampler's bound as well, which genzoo does not "
    with pytest.raises(GenzooError, match=message):
        pipeline(upsampler_decoder=Stage(8)).nll_bpd(x)


class Prior(nn.Module):
    def sample(self, n, cond, **kw):
        return torch.linspace(-3, 3, n * 16).view(n, 1, 4, 4)


def test_a_cascade_samples_the_base_then_upsamples_its_clamped_output() -> None:
    up = Stage(8)
    p = pipeline(prior=Prior(), upsampler_decoder=up, upsampler_sampler="ddim")
    g = torch.Generator().manual_seed(3)
    out = p.sample(2, generator=g)
    base = torch.linspace(-3, 3, 32).view(2, 1, 4, 4) + 5  # the base decoder's output
    ((_, z, cond, kw),) = up.calls
    assert torch.equal(cond["low_res"], base.clamp(-1, 1)) and kw["generator"] is g and kw["sampler"] == "ddim"
    assert out.shape == (2, 1, 8, 8) and torch.equal(out, z + 5)
    single = pipeline(prior=Prior())
    assert torch.equal(single.sample(2), base)


def test_the_pipeline_checks_its_denoiser_against_the_text_encoder() -> None:
    cfg = SimpleNamespace(context_dim=8, emb_dim_in=16)
    components = {"decoder": SimpleNamespace(denoiser=SimpleNamespace(cfg=cfg))}
    check_denoiser("diffusion", components, {"context_dim": 8, "emb_dim_in": 16}, "the text encoder")
    message = (
        r"^pipeline 'glide': decoder.denoiser.context_dim is 8 but the text encoder needs 32; set context_dim: 32$"
    )
    with pytest.raises(RegistryError, match=message):
        check_denoiser("glide", components, {"emb_dim_in": 16, "context_dim": 32}, "the text encoder")
    with pytest.raises(RegistryError, match=r"^pipeline 'p': decoder.denoiser.width is n/a but the CLIP needs 4; "):
        check_denoiser("p", components, {"width": 4}, "the CLIP")
    check_denoiser("p", {"decoder": SimpleNamespace(denoiser=nn.Identity())}, {"width": 4}, "x")  # no cfg: unchecked
    check_denoiser("p", {}, {"width": 4}, "x")
    message = r"^pipeline 'p': an upsampler_decoder needs an upsampler_sampler \(e.g. \{type: ddim, steps: 25\}\)$"
    with pytest.raises(RegistryError, match=message):
        check_denoiser("p", {**components, "upsampler_decoder": Stage()}, {}, "x")
    check_denoiser("p", {**components, "upsampler_decoder": Stage(), "upsampler_sampler": object()}, {}, "x")
    check_denoiser("p", {**components, "upsampler_decoder": None}, {}, "x")


def test_the_pipeline_factory_checks_caption_widths_only_for_captions() -> None:
    denoiser = Const(cfg=SimpleNamespace(context_dim=8, emb_dim_in=8))
    encoder = SimpleNamespace(width=16)
    components = {"decoder": Stage(), "encoder": encoder}
    components["decoder"].denoiser = denoiser
    data = DataSpec("shapes", (1, 4, 4), num_classes=3, has_captions=True)
    ctx = SimpleNamespace(registry=None, data=data, components=components)
    with pytest.raises(RegistryError, match=r"^pipeline 'diffusion': decoder.denoiser.context_dim is 8 but the text "):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption"), ctx)
    p = make_diffusion_pipeline(DiffusionPipelineConfig(condition="class"), ctx)
    assert isinstance(p, DiffusionPipeline) and p.condition is Conditioning.class_ and p.num_classes == 3
    denoiser.cfg = SimpleNamespace(context_dim=16, emb_dim_in=16)
    p = make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption"), ctx)
    assert p.condition is Conditioning.caption and p.components["decoder"] is components["decoder"]
    denoiser.cfg = SimpleNamespace(context_dim=16, emb_dim_in=8)
    with pytest.raises(RegistryError, match=r"decoder.denoiser.emb_dim_in is 8 but the text encoder needs 16"):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption"), ctx)
    components["encoder"] = SimpleNamespace()  # an encoder without a width: nothing to check
    make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption"), ctx)
    unlabelled = SimpleNamespace(registry=None, data=DataSpec("shapes", (1, 4, 4)), components=components)
    message = (
        r"^pipeline 'diffusion': field 'condition' is 'class' but the dataset has no classes; use condition: none$"
    )
    with pytest.raises(RegistryError, match=message):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="class"), unlabelled)


def test_an_upsampler_that_reads_the_condition_is_checked_as_the_base_is() -> None:
    denoiser = Const(cfg=SimpleNamespace(context_dim=16, emb_dim_in=16, num_classes=None))
    up = Stage(8)
    up.denoiser = Const(cfg=SimpleNamespace(context_dim=8, emb_dim_in=16, num_classes=None))
    components = {"decoder": Stage(), "encoder": SimpleNamespace(width=16), "upsampler_decoder": up}
    components["decoder"].denoiser, components["upsampler_sampler"] = denoiser, object()
    data = DataSpec("shapes", (1, 8, 8), num_classes=3, has_captions=True)
    ctx = SimpleNamespace(registry=None, data=data, components=components)
    reads = {"upsampler_condition": True}
    assert make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption"), ctx).upsampler_condition is False
    with pytest.raises(
        RegistryError, match=r"upsampler_decoder.denoiser.context_dim is 8 but the text encoder needs 16"
    ):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="caption", **reads), ctx)
    with pytest.raises(
        RegistryError, match=r"upsampler_decoder.denoiser.num_classes is None but the dataset's classes"
    ):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="class", **reads), ctx)
    up.denoiser.cfg = SimpleNamespace(context_dim=16, emb_dim_in=16, num_classes=3)
    for condition in ("caption", "class"):
        p = make_diffusion_pipeline(DiffusionPipelineConfig(condition=condition, **reads), ctx)
        assert p.upsampler_condition is True
    with pytest.raises(RegistryError, match=r"'upsampler_condition' is true but there is no condition to read"):
        make_diffusion_pipeline(DiffusionPipelineConfig(**reads), ctx)
    alone = SimpleNamespace(registry=None, data=data, components={**components, "upsampler_decoder": None})
    with pytest.raises(RegistryError, match=r"'upsampler_condition' is true but there is no upsampler_decoder"):
        make_diffusion_pipeline(DiffusionPipelineConfig(condition="class", **reads), alone)
