"""Guidance by a reference image (plugins/genzoo_image_guidance): ILVR's pixel-level refinement, feature and style
guidance, against closed forms, finite differences and every diffusion sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from genzoo_image_guidance.features import cosine_similarity, style_distance
from genzoo_image_guidance.ilvr import low_pass
from PIL import Image
from tiny import gaussian_diffusion, threads, write_recipes

from genzoo.diffusion import GaussianDiffusion
from genzoo.errors import GenzooError, RegistryError
from genzoo.plugins import default_registry

F64 = torch.float64
SAMPLERS = [e.name for e in default_registry().entries("sampler") if e.plugin == "diffusion"]
NET = {"network": "test_resnet", "layers": [0, 1]}  # timm's smallest ResNet, from scratch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with threads(1):
        yield


def build(spec: dict, **kw):
    return default_registry().build("guidance", spec, **kw)


def process(timesteps: int = 200, clip_range: float | None = 1.0) -> GaussianDiffusion:
    return gaussian_diffusion(timesteps, "cosine", clip_range=clip_range)


def sampler(name: str, steps: int = 8, clip: bool = True):
    return default_registry().build("sampler", {"type": name, "steps": steps, "clip": clip})


def images(seed: int, n: int = 1, size: int = 16, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed), dtype=dtype) * 1.8 - 0.9


# ------------------------------------------------------------------ pixel: ILVR


def test_low_pass_is_the_orthogonal_projection_onto_block_constant_images() -> None:
    x, y = images(0, 2, dtype=F64), images(1, 2, dtype=F64)
    p = low_pass(x, 4)
    torch.testing.assert_close(low_pass(p, 4), p, rtol=0, atol=1e-15)  # idempotent
    assert torch.allclose((p * y).sum(), (x * low_pass(y, 4)).sum())  # self-adjoint
    torch.testing.assert_close(p[..., :4, :4], x[..., :4, :4].mean((-2, -1), keepdim=True).expand(-1, -1, 4, 4))
    assert torch.equal(low_pass(x, 1), x)
    with pytest.raises(GenzooError, match="'factor': 3 does not divide the image side"):
        low_pass(x, 3)


def test_ilvr_step_keeps_the_high_pass_and_takes_the_noised_reference_low_pass() -> None:
    """x - phi(x) + phi(y_t), y_t = sqrt(abar) y + sqrt(1 - abar) eps: phi(y_t) - sqrt(abar) phi(y) is the mean of
    N x N independent N(0, 1 - abar) draws, so N(0, (1 - abar) / N^2) per block; on x_0 (index -1) it is phi(y)."""
    d, n = process().respace(list(range(0, 200, 20))), 4
    guidance = build({"type": "pixel", "factor": n, "seed": 3})
    x, y = images(0, 64, dtype=F64), images(1, dtype=F64)
    for i in (8, 3):
        out = guidance.after_step(d, x, i, {"reference": y})
        torch.testing.assert_close(out - low_pass(out, n), x - low_pass(x, n), rtol=0, atol=1e-14)
        abar = d.tables["abar"][i]
        blocks = torch.nn.functional.avg_pool2d(out, n) - math.sqrt(abar) * torch.nn.functional.avg_pool2d(y, n)
        var = (1 - abar) / n**2
        assert abs(blocks.mean().item()) < 4 * math.sqrt(var / blocks.numel())
        assert abs(blocks.var().item() / var - 1) < 4 * math.sqrt(2 / blocks.numel()), (blocks.var().item(), var)
        assert torch.equal(out, guidance.after_step(d, x, i, {"reference": y}))  # the seed draws the noise
    assert not torch.equal(
        guidance.after_step(d, x, 8, {"reference": y}), guidance.after_step(d, x, 7, {"reference": y})
    )
    final = guidance.after_step(d, x, -1, {"reference": y})
    torch.testing.assert_close(low_pass(final, n), low_pass(y, n).expand_as(x), rtol=0, atol=1e-14)
    late = build({"type": "pixel", "factor": n, "stop": int(d.timestep_map[4]) + 2})  # conditions t >= stop only
    assert torch.equal(late.after_step(d, x, 3, {"reference": y}), x) and torch.equal(late.after_step(d, x, -1, {}), x)
    assert not torch.equal(late.after_step(d, x, 5, {"reference": y}), x)


def point_mass_run(name: str, ref: torch.Tensor, *, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples, x*) of ``name`` with ILVR toward ``ref`` on data that is one image x*, whose exact denoiser predicts
    x* from any state."""
    d = process()
    target = images(5, dtype=F64)
    sqrt_abar, sqrt_1m = (torch.as_tensor(d.tables[k]) for k in ("sqrt_abar", "sqrt_one_minus_abar"))

    def model(x, t, cond):
        return (x - sqrt_abar[t].view(-1, 1, 1, 1) * target) / sqrt_1m[t].view(-1, 1, 1, 1)

    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=F64)
    guidance = build({"type": "pixel", "factor": 4})
    out = sampler(name, clip=clip).sample(
        d, model, noise.shape, cond={"reference": ref}, guidance=guidance, noise=noise
    )
    return out, target


@pytest.mark.parametrize("name", SAMPLERS)
def test_ilvr_on_point_mass_data_gives_the_data_with_the_reference_low_pass_for_every_sampler(name: str) -> None:
    """Every sampler's last step gives x0_hat = x*, and ILVR's last refinement (x_0, grid index -1) makes it
    x* - phi(x*) + phi(y), exactly; with y = x*, x*. With the x0_hat clamp on, the low-pass is still exactly phi(y)."""
    y = images(6, dtype=F64)
    out, target = point_mass_run(name, y, clip=False)
    torch.testing.assert_close(out, (target - low_pass(target, 4) + low_pass(y, 4)).expand_as(out), rtol=0, atol=1e-6)
    out, _ = point_mass_run(name, target, clip=False)
    torch.testing.assert_close(out, target.expand_as(out), rtol=0, atol=1e-6)
    clamped, _ = point_mass_run(name, y, clip=True)
    torch.testing.assert_close(low_pass(clamped, 4), low_pass(y, 4).expand_as(out), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", SAMPLERS)
def test_ilvr_with_the_clamp_on_keeps_the_point_mass_closed_form(name: str) -> None:
    y = images(6, dtype=F64)
    out, target = point_mass_run(name, y, clip=True)
    torch.testing.assert_close(out, (target - low_pass(target, 4) + low_pass(y, 4)).expand_as(out), rtol=0, atol=1e-6)


# ------------------------------------------------------------------ feature and style: gradients


def score_of(guidance, ref: torch.Tensor):
    with torch.no_grad():
        feats = guidance.features(ref)
    return lambda x: guidance.score(guidance.features(x), feats).sum()


@pytest.mark.parametrize("kind", ["feature", "style"])
def test_gradients_match_central_differences(kind: str) -> None:
    """The guidance's grad_x0 of its score against (S(x + h e) - S(x - h e)) / 2h, float64, on timm's test_resnet; and
    the score functions through torch.autograd.gradcheck on a two-layer conv net."""
    guidance = build({"type": kind, "scale": 1.0, **NET})
    x, ref = images(0, 2, dtype=F64), images(1, dtype=F64)
    grad = guidance.grad_log_p(x, torch.zeros(2, dtype=torch.long), {"reference": ref})
    score, h = score_of(guidance, ref.expand(2, -1, -1, -1)), 1e-5
    coords = torch.randint(0, x.numel(), (8,), generator=torch.Generator().manual_seed(0))
    for c in coords.tolist():
        e = torch.zeros(x.numel(), dtype=F64)
        e[c] = h
        with torch.no_grad():
            fd = (score(x + e.view_as(x)) - score(x - e.view_as(x))) / (2 * h)
        assert grad.flatten()[c].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-9), c
    assert grad.abs().sum() > 0

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(4, 5, 3, stride=2))
    net = net.double()
    fn = cosine_similarity if kind == "feature" else style_distance
    r = images(2, dtype=F64)[:, :, :6, :6]
    with torch.no_grad():
        ref_feats = [net[:2](r), net(r)]
    x = images(3, 2, dtype=F64)[:, :, :6, :6].requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: fn([net[:2](z), net(z)], ref_feats), (x,))


def test_gradient_is_scale_sqrt_abar_times_the_score_gradient_at_x0_hat() -> None:
    """grad_{x_t} = s sqrt(abar_t) grad_x0 score(x0_hat): the N(0, I) denoiser's Jacobian (features.py)."""
    from genzoo.diffusion.gaussian_diffusion import Prediction

    d, guidance = process(), build({"type": "feature", "scale": 7.0, **NET})
    x_t, x0, ref = images(0, 2, dtype=F64), images(1, 2, dtype=F64), images(2, dtype=F64)
    t = torch.tensor([10, 150])
    pred = Prediction(mean=x0, variance=x0, log_variance=x0, pred_xstart=x0, pred_eps=x0)
    got = guidance.gradient(d, x_t, t, {"reference": ref}, pred)
    want = 7.0 * d.extract("sqrt_abar", t, x_t) * guidance.grad_log_p(x0, t, {"reference": ref})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    with pytest.raises(GenzooError, match="scores x0_hat: call it through a sampler"):
        guidance.gradient(d, x_t, t, {"reference": ref})


# ------------------------------------------------------------------ every sampler

MU = torch.linspace(-0.6, 0.6, 16).view(1, 1, 1, 16) * torch.tensor([1.0, -0.5, 0.2]).view(1, 3, 1, 1)
VAR = 0.1


def gaussian_data_model(d: GaussianDiffusion):
    """The exact eps of data N(MU, VAR I): x0_hat = MU + sqrt(abar) VAR (x_t - sqrt(abar) MU) / (abar VAR + 1 - abar)
    (the posterior mean)."""
    abar = torch.as_tensor(d.tables["abar"], dtype=torch.float32)

    def model(x, t, cond):
        a = abar[t].view(-1, 1, 1, 1)
        x0 = MU + a.sqrt() * VAR * (x - a.sqrt() * MU) / (a * VAR + 1 - a)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return model


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize(("kind", "scale"), [("feature", 30.0), ("style", 1e5)])
def test_feature_and_style_guidance_move_every_sampler_toward_the_reference(name: str, kind: str, scale: float) -> None:
    """With the exact denoiser of Gaussian data, the same noise and generator, each sampler's guided samples are more
    like the reference (feature cosine up, Gram distance down) than its unguided ones."""
    d = process()
    guidance = build({"type": kind, "scale": scale, **NET})
    ref = images(0)
    noise = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    out = [
        sampler(name).sample(
            d,
            gaussian_data_model(d),
            noise.shape,
            cond={"reference": ref},
            guidance=g,
            noise=noise,
            generator=torch.Generator().manual_seed(2),
        )
        for g in (None, guidance)
    ]
    with torch.no_grad():
        unguided, guided = (guidance.score(guidance.features(o), guidance.features(ref.expand_as(o))) for o in out)
    assert torch.isfinite(out[1]).all() and guided.mean() > unguided.mean(), (guided.mean(), unguided.mean())


# ------------------------------------------------------------------ the reference image, errors


def test_reference_from_a_file_or_the_condition_resized_to_the_state(tmp_path: Path) -> None:
    ramp = np.arange(32) * 7
    pixels = np.stack([ramp[None, :].repeat(32, 0), ramp[:, None].repeat(32, 1), 255 - ramp[None, :].repeat(32, 0)], -1)
    pixels = pixels.astype(np.uint8)
    Image.fromarray(pixels).save(tmp_path / "ref.png")
    guidance = build({"type": "pixel", "reference": str(tmp_path / "ref.png")})
    x = torch.zeros(2, 3, 16, 16)
    file_ref = torch.as_tensor(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1  # the data size here: 64, bicubic
    got = guidance.reference.like(x, None)
    assert got.shape == x.shape and (got - torch.nn.functional.avg_pool2d(file_ref, 2)).abs().max() < 0.05
    grey = guidance.reference.like(torch.zeros(1, 1, 8, 8), {"reference": file_ref})
    torch.testing.assert_close(grey, torch.nn.functional.avg_pool2d(file_ref, 4).mean(1, keepdim=True))
    with pytest.raises(GenzooError, match="holds 2 images for 3 samples"):
        guidance.reference.like(torch.zeros(3, 3, 16, 16), {"reference": file_ref.expand(2, -1, -1, -1)})


@pytest.mark.parametrize("kind", ["pixel", "feature", "style"])
def test_a_missing_reference_is_one_clear_error(kind: str, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match=rf"guidance '{kind}': field 'reference': no image file at .*nope.png"):
        build({"type": kind, "reference": str(tmp_path / "nope.png"), **({} if kind == "pixel" else NET)})
    guidance = build({"type": kind, **({} if kind == "pixel" else NET)})
    d = process()
    with pytest.raises(GenzooError, match=rf"guidance '{kind}' needs a reference image: --set guidance.reference="):
        sampler("ddim", 2).sample(d, gaussian_data_model(d), (1, 3, 16, 16), guidance=guidance)


def test_network_errors_and_the_recipes_clip_as_the_feature_network() -> None:
    with pytest.raises(RegistryError, match="'clip' gives one embedding, not feature maps"):
        build({"type": "style", "network": "clip"})
    with pytest.raises(RegistryError, match="'layers': \\[0, 9\\] names a level test_resnet does not have"):
        build({"type": "feature", "network": "test_resnet", "layers": [0, 9]})
    with pytest.raises(RegistryError, match="is not a timm model"):
        build({"type": "feature", "network": "no-such-net"})
    guidance = build({"type": "feature", "network": "clip"})
    with pytest.raises(RegistryError, match="network 'clip' needs the recipe's CLIP"):
        guidance.bind_siblings({}, where="")

    class Clip:  # a CLIP's image tower: unit-norm embeddings
        def encode_image(self, x, t=None):
            return torch.nn.functional.normalize(x.flatten(1)[:, :12], dim=-1)

    guidance.bind_siblings({"clip": Clip()})
    x, ref = images(0, 2, dtype=F64), images(1, dtype=F64)
    grad = guidance.grad_log_p(x, torch.zeros(2, dtype=torch.long), {"reference": ref})
    a, b = x.flatten(1)[:, :12], ref.flatten(1)[:, :12].expand(2, -1)
    # d cos(a, b) / da = b / (|a| |b|) - cos(a, b) a / |a|^2
    cos = torch.nn.functional.cosine_similarity(a, b)
    want = (
        b / (a.norm(dim=1, keepdim=True) * b.norm(dim=1, keepdim=True)) - cos[:, None] * a / a.norm(dim=1)[:, None] ** 2
    )
    torch.testing.assert_close(grad.flatten(1)[:, :12], want)
    assert (grad.flatten(1)[:, 12:] == 0).all()


# ------------------------------------------------------------------ from the command line and the Python API


def test_pixel_guidance_from_the_command_line_and_the_api(tmp_path: Path) -> None:
    """`genzoo sample RUN --guidance pixel --set guidance.reference=F` on a tiny digits DDPM: the saved samples' 2x2
    block means are the reference's; the Python API takes the reference as a condition tensor."""
    from safetensors.torch import load_file

    from genzoo import api
    from genzoo.cli import main

    recipes = write_recipes(tmp_path / "recipes.yaml", "tiny-ddpm")
    run = tmp_path / "run"
    assert main(["train", "tiny-ddpm", "--recipes", str(recipes), "--out", str(run), "--no-progress"]) == 0
    ref = (np.arange(64) * 4).astype(np.uint8).reshape(8, 8)
    Image.fromarray(ref, mode="L").save(tmp_path / "ref.png")
    sample = ["sample", str(run), "-n", "3", "--steps", "10", "--guidance", "pixel", "--set", "guidance.factor=2"]
    out = tmp_path / "s.safetensors"
    argv = [*sample, "--set", f"guidance.reference={tmp_path / 'ref.png'}", "--out", str(tmp_path / "g.png")]
    assert main([*argv, "--save", str(out)]) == 0
    x = load_file(out)["samples"]
    want = torch.as_tensor(ref).float().view(1, 1, 8, 8) / 127.5 - 1
    torch.testing.assert_close(low_pass(x, 2), low_pass(want, 2).expand_as(x), rtol=0, atol=1e-5)
    assert main([*sample, "--out", str(tmp_path / "g.png")]) == 2  # no reference: one line, exit 2

    model = api.load_model(run, guidance="pixel", steps=10, sets=["guidance.factor=4"])
    y = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    x = model.sample(2, {"reference": y}, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(low_pass(x, 4), low_pass(y, 4).expand_as(x), rtol=0, atol=1e-5)
