"""Issue 24.2: editing with diffusion models (genzoo.diffusion.editing, `genzoo edit`, docs/editing.md).

Closed-form checks use exact denoisers of Gaussian data x_0 ~ N(mu, s^2 I): E[eps | x_t] = sigma (x_t - alpha mu) /
(alpha^2 s^2 + sigma^2) with alpha = sqrt(abar), sigma = sqrt(1 - abar); s = 0 is a one-image data set, whose every
reverse step predicts the image itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import gaussian_diffusion, train, write_recipes

from genzoo import api
from genzoo.diffusion import GaussianDiffusion
from genzoo.diffusion.editing import (
    EditSampler,
    MaskConditioned,
    ddim_invert,
    edit_config,
    inversion_sampler,
    known_region,
    mask_channels_spec,
    random_known,
    repaint_schedule,
)
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.samplers import forward_step
from genzoo.errors import GenzooError
from genzoo.interfaces import SamplerKind
from genzoo.plugins import default_registry

pytestmark = pytest.mark.usefixtures("one_thread")
F64 = torch.float64


class GaussianData(torch.nn.Module):
    """The exact eps-denoiser of x_0 ~ N(mu, s^2 I) under ``diffusion`` (original timestep indices)."""

    def __init__(self, mu: torch.Tensor, s: float, diffusion: GaussianDiffusion) -> None:
        super().__init__()
        self.register_buffer("mu", mu)
        self.register_buffer("abar", torch.as_tensor(diffusion.tables["abar"]))
        self.s = s

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        abar = self.abar[t].view(-1, *[1] * (x.dim() - 1)).to(x)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        return sigma * (x - alpha * self.mu) / (abar * self.s**2 + 1 - abar)


def process(schedule: str = "cosine", T: int = 100) -> GaussianDiffusion:
    return gaussian_diffusion(T, schedule, clip_range=None)


def image(seed: int = 0, shape=(1, 3, 8, 8)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1


def box_known(shape=(1, 1, 8, 8)) -> torch.Tensor:
    known = torch.ones(shape, dtype=F64)
    known[..., 2:6, 3:7] = 0
    return known


def diffusion_samplers() -> list[str]:
    reg = default_registry()
    return [n for n in reg.names("sampler") if reg.build("sampler", {"type": n}).kind is SamplerKind.DIFFUSION]


def sampler(name: str, steps: int = 10):
    return default_registry().build("sampler", {"type": name, "steps": steps})


def run(edit, name: str, x_star, *, steps: int = 10, s: float = 0.0, n: int = 2, **kw):
    d = process()
    target, known = kw.pop("target"), kw.pop("known", None)
    editor = EditSampler(sampler(name, steps), edit_config(mode=edit, **kw), target, known)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn((n, *target.shape[1:]), generator=g, dtype=F64)
    return editor.sample(d, GaussianData(x_star, s, d), noise.shape, generator=g, noise=noise)


# --------------------------------------------------------------------------- the RePaint schedule


def lugmayr_schedule(t_T: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """RePaint's ``get_schedule_jump`` (guided_diffusion/scheduler.py) with n_sample = 1, transcribed."""
    jumps = {j: jump_n_sample - 1 for j in range(0, t_T - jump_length, jump_length)}
    t, ts = t_T, []
    while t >= 1:
        t = t - 1
        ts.append(t)
        if jumps.get(t, 0) > 0:
            jumps[t] = jumps[t] - 1
            for _ in range(jump_length):
                t = t + 1
                ts.append(t)
    ts.append(-1)
    return ts


@pytest.mark.parametrize(("steps", "j", "r"), [(250, 10, 10), (25, 10, 10), (30, 4, 3), (7, 10, 5), (12, 3, 1)])
def test_repaint_schedule_is_the_papers(steps: int, j: int, r: int) -> None:
    assert repaint_schedule(steps - 1, 0, j, r) == lugmayr_schedule(steps, j, r)
    path = repaint_schedule(steps - 1, 0, j, r)
    downs = sum(b < a for a, b in zip(path, path[1:]))
    assert downs == steps + (r - 1) * j * len(range(0, steps - j, j))  # each jump walks j steps r - 1 more times


def test_a_sampler_that_stops_at_index_one_jumps_from_there() -> None:
    assert repaint_schedule(12, 1, 4, 2) == [
        *[12, 11, 10, 9, 8, 7, 6, 5],
        *[6, 7, 8, 9, 8, 7, 6, 5],  # jump from 5 (= 1 + 4)
        *[4, 3, 2, 1],
        *[2, 3, 4, 5, 4, 3, 2, 1],  # jump from 1, the last grid index a step leaves from
        -1,
    ]


# --------------------------------------------------------------------------- closed form


@pytest.mark.parametrize("name", diffusion_samplers())
def test_inpainting_a_one_image_dataset_recovers_it_with_every_sampler(name: str) -> None:
    x_star, known = image(), box_known()
    out = run("inpaint", name, x_star, target=x_star, known=known, jump_length=3, resample=2)
    assert torch.equal(out * known, (x_star * known).expand_as(out))  # the known pixels exactly, at the end
    assert (out - x_star).abs().max() < 1e-6, name  # the hole filled with the one image there is


def test_the_model_sees_the_known_region_noised_to_its_step() -> None:
    """RePaint Eq. 8: wherever the chain is (after a step down, or a jump up), the known pixels the model is given at
    timestep t are distributed as q(x_t | x0_known) = N(alpha_t x0, sigma_t^2): standardised, N(0, 1)."""
    x_star, known = image(0), box_known()
    d = process()
    exact = GaussianData(image(1), 0.0, d)  # a model of another image: the unknown region then differs
    seen = []

    def model(x, t, cond=None):
        seen.append((int(t[0]), x.clone()))
        return exact(x, t)

    editor = EditSampler(sampler("ddpm", 8), edit_config(jump_length=2, resample=3), x_star, known)
    editor.sample(d, model, (500, 3, 8, 8), generator=torch.Generator().manual_seed(0))
    abar = torch.as_tensor(d.tables["abar"])
    mask = known.bool().expand(500, 3, 8, 8)
    for t, x in seen[1:]:  # the first is x_T itself
        z = ((x - abar[t].sqrt() * x_star) / (1 - abar[t]).sqrt())[mask]
        assert abs(z.mean()) < 0.02 and abs(z.std() - 1) < 0.02, (t, z.mean(), z.std())
    assert len(seen) == sum(b < a for a, b in zip(repaint_schedule(7, 0, 2, 3), repaint_schedule(7, 0, 2, 3)[1:]))


def test_the_known_region_is_noised_from_the_runs_generator() -> None:
    """known_region draws its noise from the sampler's generator, in x's dtype (a run is reproducible from its seed
    whatever the global stream holds), and is the known image itself at the end of the chain (i = -1)."""
    d, x0, known = process(), image(0, (2, 3, 8, 8)), box_known()
    x = image(1, (2, 3, 8, 8))
    t, want_noise = torch.full((2,), 40), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(7), dtype=F64)
    want = known * d.q_sample(x0, t, want_noise) + (1 - known) * x
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        got = known_region(d, x, x0, known, 40, generator=torch.Generator().manual_seed(7))
        assert got.dtype == F64 and torch.equal(got, want)
    assert torch.equal(known_region(d, x, x0, known, -1, generator=None), known * x0 + (1 - known) * x)


def test_a_jump_up_is_the_forward_kernel_drawn_from_the_runs_generator() -> None:
    """RePaint's jump x_(i-1) -> x_i: sqrt(1 - b_i) x + sqrt(b_i) z, z from the sampler's generator in x's dtype."""
    d, x = process(), image(2, (2, 3, 8, 8))
    b = float(d.tables["betas"][30])
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4), dtype=F64)
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        got = forward_step(d, x, 30, generator=torch.Generator().manual_seed(4))
        assert got.dtype == F64 and torch.equal(got, math.sqrt(1 - b) * x + math.sqrt(b) * z)


def test_the_inversion_sampler_is_ddim_at_eta_0_on_the_samplers_grid_without_clamping() -> None:
    for base in (sampler("dpm-solver++", 12), sampler("ddim", 7), object()):
        ddim = inversion_sampler(base)
        steps = base.cfg.steps if hasattr(base, "cfg") else type(ddim.cfg)().steps
        assert (ddim.cfg.eta, ddim.cfg.clip, ddim.cfg.threshold, ddim.cfg.steps) == (0.0, False, None, steps)


def test_inpainting_a_correlated_gaussian_approaches_the_conditional_with_resampling() -> None:
    """Two pixels with correlation 0.9, the first known at 1.5: p(x_2 | x_1) = N(1.35, 0.19). Replacement alone
    (r = 1) leaves the unknown pixel too close to its prior; RePaint's resampling harmonises it (Lugmayr et al.
    Sec. 4.2)."""
    cov = torch.tensor([[1.0, 0.9], [0.9, 1.0]], dtype=F64)
    d = process("linear", 1000)

    def model(x, t, cond=None):  # exact eps of N(0, cov) on (B, 1, 1, 2): sigma C_t^-1 x, C_t = abar cov + sigma^2 I
        abar = torch.as_tensor(d.tables["abar"])[t].view(-1, 1, 1)
        c_t = abar * cov + (1 - abar) * torch.eye(2, dtype=F64)
        eps = (1 - abar).sqrt() * torch.linalg.solve(c_t, x.view(-1, 2, 1))
        return eps.view_as(x)

    target = torch.tensor([1.5, 0.0], dtype=F64).view(1, 1, 1, 2)
    known = torch.tensor([1.0, 0.0], dtype=F64).view(1, 1, 1, 2)
    means = {}
    for r in (1, 10):
        editor = EditSampler(sampler("ddpm", 50), edit_config(resample=r, jump_length=5), target, known)
        g = torch.Generator().manual_seed(0)
        out = editor.sample(d, model, (3000, 1, 1, 2), generator=g)
        means[r] = out[:, 0, 0, 1].mean().item()
    assert abs(means[10] - 1.35) < 0.1, means
    assert abs(means[10] - 1.35) < abs(means[1] - 1.35) - 0.1, means


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm-solver++"])
def test_sdedit_of_a_corrupted_image_recovers_the_one_image(name: str) -> None:
    x_star = image()
    corrupted = x_star + 0.5 * image(3)
    out = run("sdedit", name, x_star, target=corrupted, strength=0.5)
    assert (out - x_star).abs().max() < 1e-6


def test_sdedit_starts_at_the_strength_and_keeps_the_input_at_low_strength() -> None:
    """Data N(0, I): at strength t0 the edit is the input noised to t0 and denoised; at a small t0 it stays close to
    the input, at strength 1 it forgets it (the result of pure noise)."""
    x = image(4)
    near = run("sdedit", "ddim", torch.zeros_like(x), s=1.0, target=x, strength=0.05, steps=50)
    far = run("sdedit", "ddim", torch.zeros_like(x), s=1.0, target=x, strength=1.0, steps=50)
    assert (near - x).abs().mean() < 0.15 < (far - x).abs().mean()
    with pytest.raises(GenzooError, match="raise --strength or --steps"):
        run("sdedit", "ddim", x, target=x, strength=0.001)


def test_ddim_inversion_of_a_one_image_dataset_round_trips_exactly() -> None:
    """x0_hat is the image at every (x_t, t) and eps = (x_t - alpha_t x*) / sigma_t stays the same along a DDIM chain,
    so the usual inversion (eps at the point it starts from) is the DDIM step's exact inverse."""
    x_star = image()
    d = process()
    model = GaussianData(x_star, 0.0, d)
    ddim = inversion_sampler(sampler("ddim", 10))
    x_T = ddim_invert(ddim, d, model, x_star, top=9)
    assert (ddim.sample(d, model, x_star.shape, noise=x_T) - x_star).abs().max() < 1e-12
    out = run("invert", "ddim", x_star, target=x_star, n=1)
    assert (out - x_star).abs().max() < 1e-12


def test_ddim_inversion_of_gaussian_data_round_trips_to_float_precision_with_fixed_point_iterations() -> None:
    """x_0 ~ N(mu, s^2 I): a DDIM step is linear, x_{i-1} - alpha_{i-1} mu = (x_i - alpha_i mu) c_i / v_i^2 with
    c_i = alpha_{i-1} alpha_i s^2 + sigma_{i-1} sigma_i and v_i^2 = alpha_i^2 s^2 + sigma_i^2, so its exact inverse is
    x_T - alpha_T mu = (x_0 - mu) prod_i v_i^2 / c_i. The fixed-point inversion reaches it (and round-trips) to float64
    precision; the usual inversion (eps at x_{i-1}) is off, by a closed-form factor too."""
    mu, s = torch.full((1, 3, 8, 8), 0.3, dtype=F64), 0.5
    d = process("linear", 1000)
    model = GaussianData(mu, s, d)
    x0 = mu + s * image(5)
    ddim = inversion_sampler(sampler("ddim", 20))
    abar = torch.as_tensor(ddim.respaced(d).tables["abar"], dtype=F64)
    alpha, sigma = (
        torch.cat([torch.ones(1, dtype=F64), abar.sqrt()]),
        torch.cat([torch.zeros(1, dtype=F64), (1 - abar).sqrt()]),
    )
    c = alpha[:-1] * alpha[1:] * s**2 + sigma[:-1] * sigma[1:]
    v2 = alpha[1:] ** 2 * s**2 + sigma[1:] ** 2
    exact_x_T = alpha[-1] * mu + (x0 - mu) * torch.prod(v2 / c)

    def round_trip(iters: int) -> tuple[torch.Tensor, float]:
        x_T = ddim_invert(ddim, d, model, x0, top=19, iters=iters)
        back = ddim.sample(d, model, x0.shape, noise=x_T)
        return x_T, (back - x0).abs().max().item()

    x_T, exact = round_trip(80)
    assert (x_T - exact_x_T).abs().max() < 1e-10 and exact < 1e-10
    x_T, usual = round_trip(0)
    assert usual > 1e-3 and (x_T - exact_x_T).abs().max() > 1e-3


def test_every_step_goes_through_the_guidance_after_step_hook() -> None:
    seen = []

    class Spy(DiffusionGuidance):
        def after_step(self, diffusion, x, i, cond):
            seen.append(i)
            return x

    x_star, known = image(), box_known()
    d = process()
    editor = EditSampler(sampler("ddpm", 12), edit_config(jump_length=4, resample=3), x_star, known)
    editor.sample(d, GaussianData(x_star, 0.0, d), (1, 3, 8, 8), guidance=Spy(), generator=torch.Generator())
    path = repaint_schedule(11, 0, 4, 3)
    assert seen == [b for a, b in zip(path, path[1:]) if b < a]


# --------------------------------------------------------------------------- pipelines and the GLIDE recipe


def tiny_point_mass_model(tmp_path: Path):
    files = [write_recipes(tmp_path / "r.yaml", "tiny-ddpm")]
    resolved = api.resolve_recipe("tiny-ddpm", files=files, sets=["sampler.steps=10"])
    model = api.create_model(resolved).eval()
    dec = model.components["decoder"]
    x_star = image(shape=(1, 1, 8, 8)).float()
    dec.denoiser = GaussianData(x_star, 0.0, dec.diffusion)
    return model, x_star


def test_api_edit_and_invert_on_a_pipeline(tmp_path: Path) -> None:
    model, x_star = tiny_point_mass_model(tmp_path)
    original = model.components["sampler"]
    mask = 1 - box_known((1, 1, 8, 8)).float()
    g = torch.Generator().manual_seed(0)
    out = api.edit(model, x_star, mask, n=3, generator=g, resample=2, jump_length=3).images
    assert out.shape == (3, 1, 8, 8) and (out - x_star).abs().max() < 1e-4
    out = api.edit(model, -x_star, mode="sdedit", strength=0.7, generator=g).images
    assert (out - x_star).abs().max() < 1e-4
    inv = api.invert(model, x_star)
    assert (inv.images - x_star).abs().max() < 1e-5 and list(inv.latents) == ["sampler"]
    assert model.components["sampler"] is original  # the recipe's sampler is back
    with pytest.raises(GenzooError, match="needs a mask"):
        api.edit(model, x_star)
    with pytest.raises(GenzooError, match="the mask is"):
        api.edit(model, x_star, torch.ones(1, 1, 4, 4))
    with pytest.raises(GenzooError, match="strength"):
        api.edit(model, x_star, mode="sdedit", strength=1.5)


def test_random_masks_are_rectangles_and_sometimes_everything() -> None:
    torch.manual_seed(0)
    known = random_known(torch.zeros(2000, 3, 16, 16))
    assert set(known.unique().tolist()) == {0.0, 1.0}
    hole = 1 - known[:, 0]
    everything = hole.flatten(1).all(1)
    assert 0.07 < everything.float().mean() < 0.13
    frac = hole[~everything].flatten(1).mean(1)
    assert 1 / 16 - 0.02 < frac.min() and frac.max() < 9 / 16 + 0.05
    rows, cols = hole[~everything].any(2), hole[~everything].any(1)  # a rectangle: area = rows x cols
    assert torch.equal(hole[~everything].sum((1, 2)), rows.sum(1) * cols.sum(1))


def test_random_mask_rectangles_have_independent_sides_and_places_centred_on_average() -> None:
    """GLIDE Sec. 4's random regions on a 16 x 24 image: each side uniform in [1/4, 3/4] of its own axis, height and
    width drawn independently, so are the top and left offsets; centred on the image on average (pixel centres)."""
    torch.manual_seed(1)
    hole = 1 - random_known(torch.zeros(4000, 1, 16, 24), full=0.0)[:, 0]
    assert hole.flatten(1).any(1).all() and not hole.flatten(1).all(1).any()  # full=0: never the whole image
    rows, cols = hole.any(2).float(), hole.any(1).float()
    height, width = rows.sum(1), cols.sum(1)
    assert 16 / 4 - 1 <= height.min() and height.max() <= 3 * 16 / 4 + 1 and height.mean().sub(8).abs() < 0.3
    assert 24 / 4 - 1 <= width.min() and width.max() <= 3 * 24 / 4 + 1 and width.mean().sub(12).abs() < 0.3
    top, left = rows.argmax(1).float(), cols.argmax(1).float()
    corr = lambda a, b: float(torch.corrcoef(torch.stack([a, b]))[0, 1])  # noqa: E731
    assert abs(corr(height, width)) < 0.1 and abs(corr(top, left)) < 0.1 and abs(corr(top, width)) < 0.1
    centre_y = (rows * torch.arange(16)).sum(1) / height + 0.5
    centre_x = (cols * torch.arange(24)).sum(1) / width + 0.5
    assert abs(centre_y.mean() - 8) < 0.25 and abs(centre_x.mean() - 12) < 0.25
    # the draw that makes an image whole is its own: the rectangles of the other images are centred still
    hole = 1 - random_known(torch.zeros(4000, 1, 16, 24), full=0.5)[:, 0]
    cols = hole[~hole.flatten(1).all(1)].any(1).float()
    assert abs((cols * torch.arange(24)).sum(1).div(cols.sum(1)).add(0.5).mean() - 12) < 0.25


def test_glides_inpainting_input_is_the_known_pixels_and_the_mask() -> None:
    """MaskConditioned feeds [x_t, known pixels, mask]; with no inpaint condition the mask is all 0 (an unconditional
    model); mask_channels_spec widens the input to 2C + 1 and keeps the output."""
    seen = []
    net = lambda x, t, cond: seen.append((x, t, cond)) or x[:, :3]  # noqa: E731
    wrapped = MaskConditioned(net)
    x, t = torch.randn(2, 3, 4, 4), torch.tensor([5, 6])
    extra = torch.randn(2, 4, 4, 4, dtype=torch.float64)
    assert torch.equal(wrapped(x, t, {"inpaint": extra, "y": 1}), x)
    (got, tt, cond), *_ = seen
    assert torch.equal(got, torch.cat([x, extra.float()], 1)) and tt is t and cond["y"] == 1 and got.dtype == x.dtype
    for cond in (None, {"y": 1}):
        wrapped(x, t, cond)
        assert torch.equal(seen[-1][0], torch.cat([x, torch.zeros(2, 4, 4, 4)], 1)) and seen[-1][2] is cond
    assert mask_channels_spec({"type": "unet"}, 3, 6, "") == {"type": "unet", "in_channels": 7, "out_channels": 6}
    assert mask_channels_spec({"in_channels": 7, "out_channels": 3}, 3, 6, "")["out_channels"] == 3
    with pytest.raises(
        GenzooError, match=r"^decoder: inpaint .* in_channels must be 7 \(2 x 3 \+ 1\) or unset, not 3$"
    ):
        mask_channels_spec({"in_channels": 3}, 3, 6, "decoder: ")


TINY_INPAINT = [
    "data.image_size=16",
    "data.num_train=64",
    "data.num_test=16",
    "decoder.image_size=8",
    "encoder.width=32",
    "encoder.layers=1",
    "decoder.denoiser.model_channels=16",
    "decoder.denoiser.num_res_blocks=1",
    "decoder.denoiser.context_dim=32",
    "decoder.denoiser.emb_dim_in=32",
    "decoder.denoiser.attention_resolutions=[4]",
    "upsampler_decoder.denoiser.model_channels=16",
    "train.batch_size=8",
    "train.stages={decoder: 2, upsampler: 1}",
    "train.ema_decay=null",
    "sampler.steps=4",
    "upsampler_sampler.steps=3",
]


def test_the_glide_inpainting_recipe_trains_and_fills_a_mask_through_its_extra_channels(tmp_path: Path) -> None:
    model, source, _ = train(tmp_path, "glide-inpaint-shapes", TINY_INPAINT)
    base, up = model.components["decoder"], model.components["upsampler_decoder"]
    for dec in (base, up):
        assert isinstance(dec.denoiser, MaskConditioned) and dec.denoiser.net.input_conv.in_channels == 7 + (
            3 if dec is up else 0
        )
    seen = []
    hook = base.denoiser.net.register_forward_pre_hook(lambda m, args: seen.append(args[0][:, 3:].clone()))
    x = source.split("test").tensors()["image"][:1]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    g = torch.Generator().manual_seed(0)
    out = api.edit(model, x, mask, n=2, condition={"caption": ["a red circle"] * 2}, generator=g, resample=1).images
    hook.remove()
    assert out.shape == (2, 3, 16, 16)
    assert torch.equal(out * (1 - mask), (x * (1 - mask)).expand_as(out))
    known8 = 1 - torch.nn.functional.interpolate(mask, size=8, mode="area")
    x8 = torch.nn.functional.interpolate(x, size=8, mode="area")
    # CFG doubles the batch; every call saw the known pixels and the mask at the base model's size
    assert seen and all(torch.allclose(s[:, 3:], known8.expand(len(s), 1, 8, 8)) for s in seen)
    assert all(torch.allclose(s[:, :3], (x8 * known8).expand(len(s), 3, 8, 8)) for s in seen)
    plain = model.sample(2, {"caption": ["a red circle"] * 2}, generator=g)  # no mask: everything generated
    assert plain.shape == (2, 3, 16, 16)


class Constant(torch.nn.Module):
    """An x0-predicting denoiser that always predicts ``x0``: the exact one of a one-point data set."""

    def __init__(self, x0: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, x, t, cond=None):
        return self.x0.expand_as(x)


def test_latent_diffusion_is_edited_on_its_first_stages_latents() -> None:
    """ldm-shapes (x0-prediction) with the exact denoiser of the images' own latents z = encode(x): every edit
    gives back the first stage's reconstruction decode(z), and x_T has the latent shape."""
    sets = ["data.image_size=16", "data.num_train=16", "data.num_test=8", "decoder.autoencoder.codebook_size=16"]
    sets += ["decoder.autoencoder.encoder.channels=16", "decoder.autoencoder.decoder.channels=16"]
    sets += ["decoder.diffusion.denoiser.model_channels=16", "sampler.steps=4"]
    resolved = api.resolve_recipe("ldm-shapes", sets=sets)
    source = api.build_data(resolved)
    model = api.create_model(resolved, data_spec=source.spec).eval()
    dec = model.components["decoder"]
    x = source.split("test").tensors()["image"][:2]
    dec.diffusion_decoder.denoiser = Constant(dec.encode(x))
    inv = api.invert(model, x)
    assert inv.latents["sampler"][0].shape == (2, *dec.consumes.shape)
    want = model.reconstruct(x)
    assert (inv.images - want).abs().max() < 1e-4
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., 8:, :] = 1
    g = torch.Generator().manual_seed(0)
    assert (api.edit(model, x, mask, generator=g, resample=2, jump_length=2).images - want).abs().max() < 1e-4
    assert (api.edit(model, -x, mode="sdedit", generator=g).images - want).abs().max() < 1e-4


def test_unclip_is_edited_at_every_stage_with_the_images_own_embedding() -> None:
    """dalle2-shapes, untrained: without a prompt the decoder is conditioned on the image's CLIP embedding, the base
    decoder and the upsampler are both edited (the known region pasted at full size), and inversion returns x_T of
    each stage."""
    sets = ["data.image_size=16", "data.num_train=16", "data.num_test=8", "decoder.image_size=8"]
    sets += ["clip.text_tower.width=32", "clip.text_tower.layers=1", "clip.image_tower.model_channels=16"]
    sets += ["clip.embed_dim=16", "decoder.denoiser.model_channels=16", "decoder.denoiser.num_res_blocks=1"]
    sets += [
        "decoder.denoiser.context_dim=32",
        "decoder.denoiser.emb_dim_in=16",
        "decoder.denoiser.attention_resolutions=[4]",
    ]
    sets += ["upsampler_decoder.denoiser.model_channels=16", "prior.width=32", "prior.layers=1"]
    sets += ["sampler.steps=3", "upsampler_sampler.steps=2"]
    resolved = api.resolve_recipe("dalle2-shapes", sets=sets)
    source = api.build_data(resolved)
    model = api.create_model(resolved, data_spec=source.spec).eval()
    x = source.split("test").tensors()["image"][:1]
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, 8:] = 1
    g = torch.Generator().manual_seed(0)
    out = api.edit(model, x, mask, n=2, generator=g, resample=1).images
    assert out.shape == (2, 3, 16, 16) and torch.equal(out * (1 - mask), (x * (1 - mask)).expand_as(out))
    inv = api.invert(model, x)
    assert {r: v[0].shape for r, v in inv.latents.items()} == {
        "sampler": (1, 3, 8, 8),
        "upsampler_sampler": (1, 3, 16, 16),
    }


# --------------------------------------------------------------------------- the command line


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    from PIL import Image

    from genzoo.cli import main

    root = tmp_path_factory.mktemp("edit")
    recipes = write_recipes(root / "r.yaml", "tiny-ddpm")
    run_dir = root / "run"
    assert main(["train", "tiny-ddpm", "--recipes", str(recipes), "--out", str(run_dir), "--no-progress"]) == 0
    img = root / "img.png"
    Image.fromarray((torch.rand(8, 8, generator=torch.Generator().manual_seed(0)) * 255).byte().numpy()).save(img)
    mask = root / "mask.png"
    m = torch.zeros(8, 8, dtype=torch.uint8)
    m[2:6, 2:6] = 255
    Image.fromarray(m.numpy()).save(mask)
    return run_dir, img, mask


def test_genzoo_edit_writes_the_edits(tiny_run, tmp_path: Path, capsys) -> None:
    from safetensors.torch import load_file

    from genzoo.cli import main

    run_dir, img, mask = tiny_run
    out, raw = tmp_path / "e.png", tmp_path / "e.safetensors"
    argv = ["edit", str(run_dir), "--image", str(img), "--steps", "5", "--out", str(out)]
    assert (
        main([*argv, "--mask", str(mask), "-n", "2", "--resample", "2", "--jump-length", "2", "--save", str(raw)]) == 0
    )
    assert out.stat().st_size > 0 and load_file(raw)["edits"].shape == (2, 1, 8, 8)
    assert "known region kept to max |error| 0" in capsys.readouterr().out
    assert main([*argv, "--strength", "0.5"]) == 0  # sdedit
    assert main([*argv, "--mode", "invert", "--save", str(raw)]) == 0
    assert "DDIM inversion round trip: RMSE" in capsys.readouterr().out
    assert load_file(raw)["x_T/sampler"].shape == (1, 1, 8, 8)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mode", "inpaint"], "inpainting needs a mask: pass --mask FILE"),
        (["--strength", "1.5"], "edit setting strength=1.5: input should be less than or equal to 1"),
        (["--mask", "BIG"], "--mask .* is 12x12 but --image .* is 8x8; pass a mask the size of the image"),
        (["--mask", "MASK", "--mode", "invert"], "DDIM inversion takes no mask"),
        (["--resample", "0", "--mask", "MASK"], "edit setting resample=0"),
    ],
)
def test_genzoo_edit_refuses_bad_input_in_one_line(tiny_run, tmp_path: Path, capsys, extra, message) -> None:
    from PIL import Image

    from genzoo.cli import main

    run_dir, img, mask = tiny_run
    big = tmp_path / "big.png"
    Image.new("L", (12, 12)).save(big)
    extra = [{"BIG": str(big), "MASK": str(mask)}.get(a, a) for a in extra]
    assert main(["edit", str(run_dir), "--image", str(img), "--out", str(tmp_path / "o.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genzoo edit: error: ")
    import re

    assert re.search(message, err), err
