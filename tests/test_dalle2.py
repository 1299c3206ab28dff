"""DALL·E 2 / unCLIP: slerp, the decoder's embedding conditioning and independent dropout, both priors
(closed-form checks of the diffusion prior's x0 path and of the AR prior's quantisation), the pipeline's
stages, uses and command line, and the metrics that measure it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from genzoo_dalle2.pipeline import slerp
from genzoo_dalle2.prior import ARPrior, ARPriorConfig, DiffusionPrior, DiffusionPriorConfig
from tiny import assert_refused, build, shapes_judge, tiny_unet, train

from genzoo import api
from genzoo.errors import GenzooError, RegistryError
from genzoo.plugins import default_registry

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = [
    "a large red circle in the top left",
    "bottom right: a small blue cross",
    "a green square, big, at the centre",
]


def test_slerp_keeps_unit_norm_and_moves_at_constant_angular_speed() -> None:
    torch.manual_seed(0)
    a, b = torch.nn.functional.normalize(torch.randn(2, 16), dim=-1)
    w = torch.tensor([0.0, 0.25, 0.5, 1.0])
    path = slerp(a, b, w)
    assert torch.allclose(path[0], a, atol=1e-5) and torch.allclose(path[-1], b, atol=1e-5)
    assert torch.allclose(path.norm(dim=-1), torch.ones(4), atol=1e-5)
    omega = torch.arccos((a * b).sum())
    assert torch.allclose(torch.arccos((path @ a).clamp(-1, 1)), w * omega, atol=1e-4)


def test_unclip_unet_reads_z_i_as_tokens_and_drops_embedding_and_caption_independently() -> None:
    from genzoo.nn.unet import UNetConfig

    net = tiny_unet(std=0.05, context_dim=12, emb_dim_in=10, emb_tokens=4)  # every path matters
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    emb, ctx, mask = (
        torch.randn(2, 10),
        torch.randn(2, 5, 12),
        torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool),
    )
    both = {"emb": emb, "context": ctx, "context_mask": mask}
    yes, no = torch.tensor([True, True]), torch.tensor([False, False])
    # a dropped embedding is the missing one (the learned null, in the time embedding and the 4 tokens alike) ...
    assert torch.allclose(
        net(x, t, {**both, "drop_emb": yes}), net(x, t, {"context": ctx, "context_mask": mask}), atol=1e-5
    )
    # ... a dropped caption the missing caption, and ``drop`` removes both
    assert torch.allclose(net(x, t, {**both, "drop_context": yes}), net(x, t, {"emb": emb}), atol=1e-5)
    assert torch.allclose(net(x, t, {**both, "drop": yes}), net(x, t, None), atol=1e-5)
    assert torch.allclose(net(x, t, {**both, "drop_emb": no, "drop_context": no}), net(x, t, both), atol=1e-6)
    other = {**both, "emb": emb.roll(1, 0)}
    with torch.no_grad():  # z_i still reaches the output through its 4 context tokens alone ...
        net.emb_proj.weight.zero_()
        assert (net(x, t, both) - net(x, t, other)).abs().max() > 1e-6
        net.emb_to_tokens.weight.zero_()  # ... and through nothing else
        assert torch.equal(net(x, t, both), net(x, t, other))
    with pytest.raises(ValueError, match="context_dim and emb_dim_in"):
        UNetConfig(in_channels=3, image_size=8, emb_tokens=4)


class _Clip:
    embed_dim, text_width, context_length = 6, 8, 5


def _bound(prior):
    prior.bind_siblings({"clip": _Clip()})
    return prior


def test_diffusion_prior_with_the_exact_x0_predictor_samples_the_gaussian_it_was_fitted_to() -> None:
    """Standardised z_i ~ N(0, I) has E[x0 | x_t] = sqrt(abar_t) x_t (x0-prediction); with that denoiser the
    shared samplers must return N(0, I), and the prior must map it back to N(mean, std^2) of the data."""
    from genzoo.diffusion.samplers import DDIMConfig, DDIMSampler

    prior = _bound(DiffusionPrior(DiffusionPriorConfig(best_of=1)))
    mean, std = torch.linspace(-0.3, 0.3, 6), torch.linspace(0.05, 0.2, 6)
    prior.fit(mean + std * torch.randn(20000, 6, generator=torch.Generator().manual_seed(0)))
    assert torch.allclose(prior.mean, mean, atol=0.01) and torch.allclose(prior.std, std, rtol=0.03)
    diffusion = prior.model.diffusion
    sqrt_abar = torch.tensor(diffusion.tables["sqrt_abar"], dtype=torch.float32)

    class Exact(torch.nn.Module):
        def forward(self, x, t, cond=None):
            return sqrt_abar[t.round().long()].view(-1, 1) * x

    prior.model.denoiser = Exact()
    sampler = DDIMSampler(DDIMConfig(steps=50))
    z = prior.draw(4000, None, sampler=sampler, guidance=None, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z.mean(0), mean, atol=0.012), z.mean(0)
    assert torch.allclose(z.std(0), std, rtol=0.06), z.std(0)


def test_best_of_keeps_the_draw_closest_to_the_text_embedding() -> None:
    prior = _bound(DiffusionPrior(DiffusionPriorConfig(best_of=3)))
    prior.fit(torch.randn(100, 6))
    g = torch.Generator().manual_seed(0)
    text = torch.nn.functional.normalize(torch.randn(4, 6, generator=g), dim=-1)
    noise = torch.randn(12, 6, generator=g)

    def draw(n, cond, **kw):  # draw j of caption i: its z_t plus noise; the k draws of a caption are consecutive
        return cond["text_emb"] + 0.5 * noise[:n]

    prior.draw = draw
    z = prior.sample(4, {"text_emb": text}, sampler=object())
    cands = torch.nn.functional.normalize((text.repeat_interleave(3, 0) + 0.5 * noise).view(4, 3, 6), dim=-1)
    best = cands[torch.arange(4), (cands * text[:, None]).sum(-1).argmax(1)]
    assert torch.allclose(z, best, atol=1e-6) and torch.allclose(z.norm(dim=-1), torch.ones(4))


def test_a_dropped_caption_is_the_missing_one_for_both_priors() -> None:
    from genzoo_dalle2.prior import CaptionPrefix

    torch.manual_seed(0)
    prefix = CaptionPrefix(dim=6, text_width=8, text_length=5, n_embd=16)
    torch.nn.init.normal_(prefix.null_text)
    torch.nn.init.normal_(prefix.null_text_emb)
    cond = {
        "text_emb": torch.randn(3, 6),
        "context": torch.randn(3, 4, 8),
        "context_mask": torch.ones(3, 4, dtype=torch.bool),
    }
    dropped = prefix({**cond, "drop": torch.tensor([True, False, True])}, 3)
    missing, given = prefix(None, 3), prefix(cond, 3)
    assert torch.equal(dropped[[0, 2]], missing[[0, 2]]) and torch.equal(dropped[1], given[1])
    assert given.shape == (3, 6, 16) and not torch.allclose(given[0], missing[0])


def test_ar_prior_quantisation_round_trips_within_half_a_bin() -> None:
    prior = _bound(ARPrior(ARPriorConfig(pca_dims=3, bins=256, bin_range=4.0)))
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(6, 3, generator=g))[0].T  # data on a 3-d subspace of the 6-d space
    z = torch.randn(5000, 3, generator=g) * torch.tensor([0.3, 0.2, 0.1]) @ basis + 0.05
    prior.fit(z)
    codes = prior.quantize(z)
    assert codes.shape == (5000, 3) and codes.min() >= 0 and codes.max() < 256
    inside = ((z - prior.mean) @ prior.basis.T / prior.scale).abs().amax(1) < 4.0
    half_bin = (prior.scale * 4.0 / 256).norm()  # the bins' half-width, along all three components at once
    err = (prior.dequantize(codes) - z).norm(dim=1)
    assert (err[inside] <= half_bin * 1.0001).all() and inside.float().mean() > 0.99


def test_an_unfitted_or_unbound_prior_says_what_to_do() -> None:
    with pytest.raises(GenzooError, match="not bound to a CLIP"):
        DiffusionPrior(DiffusionPriorConfig()).sample(2, None, sampler=object())
    with pytest.raises(GenzooError, match="prior stage first"):
        _bound(DiffusionPrior(DiffusionPriorConfig())).sample(2, None, sampler=object())
    prior = _bound(ARPrior(ARPriorConfig(pca_dims=3)))
    prior.fit(torch.randn(50, 6))
    with pytest.raises(GenzooError, match="token sampler"):
        prior.sample(2, None, sampler=None)
    with pytest.raises(RegistryError, match="pca_dims"):
        _bound(ARPrior(ARPriorConfig(pca_dims=7)))


TINY = [
    "data.image_size=16",
    "data.num_train=2000",
    "decoder.image_size=8",
    "pipeline.fit_images=1000",
    "clip.text_tower.width=32",
    "clip.text_tower.layers=1",
    "clip.image_tower.model_channels=16",
    "clip.embed_dim=16",
    "decoder.denoiser.model_channels=16",
    "decoder.denoiser.num_res_blocks=1",
    "decoder.denoiser.context_dim=32",
    "decoder.denoiser.emb_dim_in=16",
    "decoder.denoiser.attention_resolutions=[4]",
    "decoder.denoiser.dropout=0.0",
    "upsampler_decoder.denoiser.model_channels=16",
    "train.batch_size=32",
    "train.lr=2e-3",
    "train.ema_decay=null",
    "train.warmup_steps=20",
    "sampler.steps=8",
    "upsampler_sampler.steps=4",
]
TINY_PRIOR = {
    "dalle2-shapes": ["prior.width=64", "prior.layers=2", "prior_sampler.steps=8"],
    "dalle2-ar-shapes": ["prior.width=64", "prior.layers=2", "prior.pca_dims=8", "prior.bins=16"],
}


@pytest.fixture(scope="module")
def dalle2_run(tmp_path_factory) -> tuple[Path, object, object]:
    run = tmp_path_factory.mktemp("dalle2")
    model, source, _ = train(
        run,
        "dalle2-shapes",
        [*TINY, *TINY_PRIOR["dalle2-shapes"], "train.stages={clip: 80, prior: 150, decoder: 150, upsampler: 20}"],
    )
    return run, model, source


def test_dalle2_trains_its_stages_on_the_clip_it_trained_first(dalle2_run) -> None:
    run, model, source = dalle2_run
    assert model.stages == ("clip", "prior", "decoder", "upsampler")
    train_images = source.split("train").tensors()["image"][:1000]
    z = model.image_embeddings(train_images)  # the prior's statistics are those of the final CLIP's embeddings
    prior = model.components["prior"]
    assert torch.allclose(prior.mean, z.mean(0), atol=1e-5) and torch.allclose(prior.std, z.std(0), atol=1e-5)
    test = source.split("test").tensors()
    images, captions = test["image"][:256], test["caption"][:256]
    text = model.components["encoder"].encode({"caption": captions})
    z_i = model.image_embeddings(images)
    torch.manual_seed(0)
    right = prior.training_losses(z_i, text)["loss"].item()
    torch.manual_seed(0)
    wrong = prior.training_losses(z_i, {k: v.roll(1, 0) for k, v in text.items()})["loss"].item()
    assert right < 0.9 * wrong, (right, wrong)  # the prior reads the caption
    dec, x0 = model.components["decoder"], model.low_res(images)
    t, noise = torch.randint(0, 1000, (len(x0),), generator=torch.Generator().manual_seed(0)), torch.randn_like(x0)

    def loss(emb: torch.Tensor) -> float:
        return dec.diffusion.training_losses(dec.denoiser, x0, t, cond={"emb": emb}, noise=noise)["mse"].mean().item()

    assert loss(z_i) < 0.97 * loss(z_i.roll(1, 0))  # the decoder reads z_i


def test_dalle2_text_to_image_variations_interpolation_and_prior_cosine(dalle2_run) -> None:
    run, model, source = dalle2_run
    g = torch.Generator().manual_seed(0)
    assert model.sample(3, {"caption": CAPTIONS}, generator=g).shape == (3, 3, 16, 16)
    assert model.sample(2, None, generator=g).shape == (2, 3, 16, 16)  # the null caption
    test = source.split("test").tensors()
    assert model.variations(test["image"][:2], 3, generator=g).shape == (6, 3, 16, 16)
    frames = model.interpolate(test["image"][0], test["image"][1], 4, generator=g)
    assert frames.shape == (4, 3, 16, 16) and torch.isfinite(frames).all()
    cos = model.prior_cosine(test["image"][:128], test["caption"][:128], generator=g)
    wrong = model.prior_cosine(test["image"][:128], test["caption"][1:129], generator=g)
    assert cos["prior_cosine"] > wrong["prior_cosine"] + 0.05, (
        cos,
        wrong,
    )  # the drawn z_i belong to their captions' images
    stats = model.components["prior"].mean.clone()
    model.begin_stage("prior", {"image": test["image"][:100]})  # statistics already there stay (--init-from)
    assert torch.equal(model.components["prior"].mean, stats)
    with pytest.raises(GenzooError, match="--prompt"):
        model.sample(2, {"y": torch.zeros(2, dtype=torch.long)})


def test_dalle2_resumes_exactly_across_the_prior_statistics(tmp_path: Path) -> None:
    from genzoo.training import TrainConfig, Trainer

    sets = [
        *TINY,
        *TINY_PRIOR["dalle2-shapes"],
        "train.stages={clip: 4, prior: 6, decoder: 4, upsampler: 0}",
        "train.log_every=1",
        "train.checkpoint_every=7",
        "train.sample_every=2",
        "train.sample_n=4",
        "data.num_train=200",
        "pipeline.fit_images=100",
    ]
    resolved = api.resolve_recipe("dalle2-shapes", sets=sets)
    source = api.build_data(resolved)
    data, config = source.split("train").tensors(), TrainConfig.model_validate(resolved["train"])

    def run(out: Path, stop_at: int | None = None, resume: bool = False):
        torch.manual_seed(0)
        model = api.create_model(resolved, data_spec=source.spec)
        Trainer(model, data, config=config, run_dir=out, recipe=resolved, progress=False).fit(
            resume=resume, stop_at=stop_at
        )
        return model

    straight = run(tmp_path / "straight")
    run(tmp_path / "cut", stop_at=7)  # inside the prior stage, after its statistics were fitted
    resumed = run(tmp_path / "cut", resume=True)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # grids from step 6 on: none while the prior had no statistics (the clip stage), no error either
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir())[0] == "step-00000006.png"


def test_dalle2_from_the_command_line_with_each_stage_set_on_its_own(dalle2_run, tmp_path: Path) -> None:
    from genzoo.cli import main
    from genzoo.training.images import save_grid

    run, _, source = dalle2_run
    out = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                str(run),
                "-n",
                "2",
                "--prompt",
                CAPTIONS[0],
                "--prior-steps",
                "4",
                "--prior-scale",
                "1.5",
                "--steps",
                "4",
                "--scale",
                "2",
                "--upsampler-steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = api.load_model(run, prior_steps=4, prior_guidance="none", upsampler_steps=2, steps=3)
    assert m.components["prior_sampler"].cfg.steps == 4 and m.components.get("prior_guidance") is None
    assert m.components["upsampler_sampler"].cfg.steps == 2 and m.components["sampler"].cfg.steps == 3
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    test = source.split("test").tensors()["image"]
    save_grid(test[:1], a, min_side=1)
    save_grid(test[1:2], b, min_side=1)
    assert main(["sample", str(run), "-n", "3", "--image", str(a), "--steps", "3", "--out", str(out)]) == 0
    assert (
        main(["sample", str(run), "-n", "3", "--interpolate", str(a), str(b), "--steps", "3", "--out", str(out)]) == 0
    )
    assert main(["sample", str(run), "-n", "2", "--image", str(tmp_path / "missing.png"), "--out", str(out)]) == 2
    assert (
        main(["sample", str(run), "-n", "2", "--upsampler-scale", "2", "--out", str(out)]) == 2
    )  # no upsampler guidance


def test_the_ar_prior_swaps_in_and_trains_alone_on_the_trained_decoder(dalle2_run, tmp_path: Path) -> None:
    from genzoo.cli import main

    run, model, _ = dalle2_run
    ar = tmp_path / "ar"
    sets = [
        *TINY,
        *TINY_PRIOR["dalle2-ar-shapes"],
        "train.stages={clip: 0, prior: 30, decoder: 0, upsampler: 0}",
        "train.checkpoint_every=100000",
        "train.sample_every=0",
    ]
    assert (
        main(
            [
                "train",
                "dalle2-ar-shapes",
                "--out",
                str(ar),
                "--init-from",
                str(run),
                "--no-progress",
                *[a for s in sets for a in ("--set", s)],
            ]
        )
        == 0
    )
    m = api.load_model(ar)
    for role in ("clip", "decoder", "upsampler_decoder"):  # taken from the diffusion-prior run, not retrained
        mine, theirs = m.components[role].state_dict(), model.components[role].state_dict()
        assert all(torch.equal(mine[k], theirs[k].cpu()) for k in mine), role
    assert m.sample(2, {"caption": CAPTIONS[:2]}, generator=torch.Generator().manual_seed(0)).shape == (2, 3, 16, 16)


def test_a_dalle2_recipe_checks_its_parts() -> None:
    assert_refused("dalle2-shapes", [*TINY, "decoder.denoiser.emb_dim_in=32"], "emb_dim_in is 32 but the CLIP needs 16")
    assert_refused("dalle2-shapes", [*TINY, "components.clip=null"], "components.clip")
    assert_refused("dalle2-shapes", [*TINY, "clip.weights=/nonexistent/run"], "not a genzoo run")


class VariationOracle(torch.nn.Module):
    """Varies an image into itself (or, ``liar``, into the next image)."""

    def __init__(self, *, liar: bool = False) -> None:
        super().__init__()
        self.liar, self.components, self.condition = liar, {}, None

    def variations(self, images, k=1, *, generator=None):
        return images.roll(1, 0) if self.liar else images


def test_variation_metric_tells_a_faithful_model_from_one_that_is_not(cheap_judges) -> None:
    judged = shapes_judge({"variations": default_registry().build("metric", {"type": "variations", "images": 300})})
    good, bad = judged(VariationOracle()), judged(VariationOracle(liar=True))
    assert good["variation_all"] > 0.8 and bad["variation_all"] < 0.2, (good, bad)
    assert math.isclose(sum(good[f"variation_{a}"] > 0.9 for a in ("shape", "colour", "size", "position")), 4)


def test_dalle2_takes_an_open_clip_model_in_place_of_its_own_clip() -> None:
    """The same recipe with an open_clip architecture (random weights: no network in tests): no clip stage,
    the priors and the decoder sized from it, and its per-token text outputs read before pooling."""
    torch.manual_seed(0)
    sets = [
        *TINY,
        *TINY_PRIOR["dalle2-shapes"],
        "components.clip={type: open-clip, model: ViT-S-32}",
        "decoder.denoiser.emb_dim_in=384",
        "decoder.denoiser.context_dim=384",
        "train.stages={prior: 1, decoder: 1, upsampler: 1}",
    ]
    model, source, _ = build("dalle2-shapes", sets)
    assert model.stages == ("prior", "decoder", "upsampler")
    clip = model.components["clip"]
    text = model.components["encoder"].encode({"caption": CAPTIONS})
    assert text["context"].shape == (3, 77, 384) and text["text_emb"].shape == (3, 384)
    eot = text["tokens"].argmax(-1)  # the token outputs are the ones open_clip pools: z_t is their EOT row, projected
    pooled = text["context"][torch.arange(3), eot] @ clip.model.text_projection
    assert torch.allclose(torch.nn.functional.normalize(pooled, dim=-1), text["text_emb"], atol=1e-4)
    data = source.split("train").tensors()
    model.begin_stage("prior", {"image": data["image"][:64]})
    batch = {"image": data["image"][:4], "caption": list(data["caption"][:4])}
    for stage in ("prior", "decoder"):
        assert torch.isfinite(model.training_losses(batch, stage=stage)["loss"])
    assert model.sample(2, {"caption": CAPTIONS[:2]}, generator=torch.Generator().manual_seed(0)).shape == (
        2,
        3,
        16,
        16,
    )
