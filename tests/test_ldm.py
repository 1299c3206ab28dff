"""Latent diffusion (plugins/genzoo_ldm): a first-stage autoencoder composed with the shared diffusion decoder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genzoo import api
from genzoo.errors import GenzooError
from genzoo.interfaces import missing_latent_interface
from genzoo.plugins import default_registry
from genzoo.training import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = [
    "data.image_size=16",
    "data.num_train=96",
    "data.num_test=32",
    "decoder.autoencoder.codebook_size=16",
    "decoder.autoencoder.encoder.channels=16",
    "decoder.autoencoder.decoder.channels=16",
    "decoder.autoencoder.encoder.num_res_blocks=1",
    "decoder.autoencoder.decoder.num_res_blocks=1",
    "decoder.diffusion.denoiser.model_channels=16",
    "train.batch_size=8",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "train.sample_every=0",
]
CLASS = [
    "pipeline.condition=class",
    "decoder.diffusion.denoiser.num_classes=24",
    "decoder.diffusion.cond_drop=0.2",
    "guidance={type: cfg, scale: 3.0}",
]
DIFFUSION_SAMPLERS = [e.name for e in default_registry().entries("sampler") if e.plugin == "diffusion"]


def build(sets=(), recipe: str = "ldm-shapes"):
    resolved = api.resolve_recipe(recipe, sets=TINY + list(sets))
    source = api.build_data(resolved)
    return resolved, source, api.create_model(resolved, data_spec=source.spec)


def train(tmp_path: Path, sets=(), stages="{autoencoder: 3, decoder: 3}"):
    resolved, source, model = build([f"train.stages={stages}", *sets])
    data = source.split("train")
    meta = {"data_spec": api.data_spec_dict(source.spec), "data_fingerprint": data.fingerprint()}
    config = TrainConfig.model_validate(resolved["train"])
    Trainer(model, data.tensors(), config=config, run_dir=tmp_path, recipe=resolved, meta=meta, progress=False).fit()
    return model, data


def test_the_composition_builds_from_the_recipe_and_round_trips_latents() -> None:
    _, source, model = build()
    dec = model.components["decoder"]
    assert model.stages == ("autoencoder", "decoder")
    assert dec.consumes.shape == (4, 4, 4) and dec.produces.shape == (3, 16, 16)  # f = 4: a 4x4 grid of 4-d latents
    assert model.components["prior"].produces.shape == (4, 4, 4)  # the Gaussian prior is bound to the latent shape
    assert missing_latent_interface(dec.autoencoder) == []
    x = source.split("train").tensors()["image"][:5]
    z = dec.encode(x)
    assert z.shape == (5, 4, 4, 4) and not z.requires_grad
    assert dec.decode_scaled(z).shape == x.shape and dec.reconstruct(x).abs().max() <= 1
    vq = dec.autoencoder  # decoding the latents quantises them: the same image as decoding their codes
    assert torch.allclose(vq.decode_latents(vq.encode_latents(x)), vq.decode(vq.encode_codes(x)), atol=1e-5)


def test_the_scale_factor_is_fitted_to_unit_std_once_and_a_given_one_is_kept() -> None:
    _, source, model = build()
    dec, images = model.components["decoder"], source.split("train").tensors()["image"]
    assert not bool(dec.scale_fitted)
    scale = dec.fit_scale(images)
    assert abs(dec.encode(images).std().item() - 1) < 1e-3 and scale == pytest.approx(float(dec.scale))
    with torch.no_grad():
        dec.autoencoder.encoder.body[0].weight.mul_(3)  # a fitted scale is not refitted (a resumed run keeps its own)
    assert dec.fit_scale(images) == scale
    _, _, given = build(["decoder.scale_factor=0.5"])
    assert bool(given.components["decoder"].scale_fitted) and given.components["decoder"].fit_scale(images) == 0.5


def test_both_stages_train_and_the_first_is_frozen_in_the_second(tmp_path: Path) -> None:
    resolved, source, model = build(["train.stages={autoencoder: 3, decoder: 3}"])
    data = source.split("train")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    seen = {}

    def spy(stage, tensors, orig=model.begin_stage):
        seen[stage] = {k: v.clone() for k, v in model.components["decoder"].autoencoder.state_dict().items()}
        orig(stage, tensors)

    model.begin_stage = spy
    config = TrainConfig.model_validate(resolved["train"])
    meta = {"data_spec": api.data_spec_dict(source.spec)}
    Trainer(model, data.tensors(), config=config, run_dir=tmp_path, recipe=resolved, meta=meta, progress=False).fit()
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["autoencoder"] * 3 + ["decoder"] * 3
    assert "perplexity" in rows[0] and "mse" in rows[-1]
    after = model.state_dict()
    first = "decoder.autoencoder.encoder.body.0.weight"
    assert not torch.equal(before[first], after[first])
    for k, v in seen["decoder"].items():  # the autoencoder at the start of the diffusion stage is the one it ends with
        assert torch.equal(v, model.components["decoder"].autoencoder.state_dict()[k]), k
    moved = [
        k for k in after if k.startswith("decoder.diffusion_decoder.denoiser") and not torch.equal(before[k], after[k])
    ]
    assert moved and bool(model.components["decoder"].scale_fitted)


def test_a_compare_budget_is_split_by_timing_each_stage() -> None:
    from genzoo.eval.compare import _steps_in

    resolved, source, model = build()
    config = TrainConfig.model_validate(resolved["train"])
    steps = _steps_in(model, source.split("train"), config, 0.01, torch.device("cpu"), {}, probe_steps=3)
    assert set(steps) == {"autoencoder", "decoder"} and all(n >= 1 for n in steps.values())
    assert not bool(model.components["decoder"].scale_fitted)  # the probe trained a copy
    # with the recipe's steps as shares, the stages keep the recipe's ratio of steps
    shares = _steps_in(
        model, source.split("train"), config, 5.0, torch.device("cpu"), {"autoencoder": 300, "decoder": 100}
    )
    assert shares["decoder"] > 10 and abs(shares["autoencoder"] - 3 * shares["decoder"]) <= 3


def test_a_budget_that_buys_part_of_a_recipe_shrinks_its_warm_up_in_proportion() -> None:
    from genzoo.eval.compare import budgeted_stages

    config = TrainConfig(warmup_steps=500)
    recipe = {"clip": 1500, "decoder": 3000, "upsampler": 600}
    short = budgeted_stages(config, {"clip": 570, "decoder": 1140, "upsampler": 228}, recipe)
    assert short.stages == {"clip": 570, "decoder": 1140, "upsampler": 228} and short.minutes is None
    assert short.warmup_steps == 190  # 500 x 0.38, the fraction of the recipe's steps the budget buys
    assert config.warmup_steps == 500  # a copy
    longer = budgeted_stages(config, {"clip": 3000, "decoder": 6000, "upsampler": 1200}, recipe)
    assert longer.warmup_steps == 500  # a budget beyond the recipe keeps its warm-up
    assert budgeted_stages(TrainConfig(warmup_steps=0), {"decoder": 10}, {"decoder": 3000}).warmup_steps == 0
    assert budgeted_stages(config, {"decoder": 1}, {"decoder": 3000}).warmup_steps == 1  # never 0 from rounding
    assert budgeted_stages(config, {"a": 5, "b": 7}, {}).warmup_steps == 500  # no recipe steps: nothing to scale


@pytest.mark.parametrize("sampler", DIFFUSION_SAMPLERS)
def test_every_diffusion_sampler_draws_images(sampler: str) -> None:
    resolved, source, model = build([f"sampler={{type: {sampler}, steps: 3}}"])
    model.components["decoder"].fit_scale(source.split("train").tensors()["image"])
    x = model.eval().sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1


def test_class_conditional_with_classifier_free_guidance(tmp_path: Path) -> None:
    model, _ = train(tmp_path, CLASS, stages="{autoencoder: 2, decoder: 2}")
    calls = []
    unet = model.components["decoder"].denoiser
    unet.register_forward_hook(lambda m, args, out: calls.append(args[0].shape[0]))
    model = model.eval()
    x = model.sample(3, {"y": torch.tensor([0, 5, 23])}, generator=torch.Generator().manual_seed(1))
    assert x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert calls and set(calls) == {6}  # one batched pass: conditional and null halves
    loaded = api.load_model(tmp_path, guidance="none")
    assert loaded.components.get("guidance") is None
    assert loaded.sample(2, {"y": torch.tensor([1, 2])}).shape == (2, 3, 16, 16)


def test_a_checkpoint_reloads_to_identical_samples(tmp_path: Path) -> None:
    model, _ = train(tmp_path)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731
    loaded = api.load_model(tmp_path)
    assert float(loaded.components["decoder"].scale) == float(model.components["decoder"].scale) != 1.0
    saved = {k: v for k, v in loaded.state_dict().items()}
    model.load_state_dict(saved)  # the EMA weights the checkpoint holds
    assert torch.equal(model.eval().sample(3, generator=g()), loaded.sample(3, generator=g()))
    assert torch.equal(loaded.sample(3, generator=g()), api.load_model(tmp_path).sample(3, generator=g()))


def test_a_first_stage_without_the_latent_interface_is_refused_naming_the_field() -> None:
    with pytest.raises(
        GenzooError,
        match=r"field 'autoencoder': decoder 'generator' has no latent interface "
        r"\(no latent_shape, encode_latents, decode_latents\)",
    ):
        build(["decoder.autoencoder={type: generator}"])
    with pytest.raises(GenzooError, match=r"field 'diffusion': image_size is 8"):
        build(["decoder.diffusion.image_size=8"])
    with pytest.raises(GenzooError, match=r"components.guidance 'classifier' trains on images"):
        build(
            [
                "pipeline.condition=class",
                "decoder.diffusion.denoiser.num_classes=24",
                "guidance={type: classifier, classifier: {type: noisy-classifier, model_channels: 16}}",
            ]
        )


def test_a_vae_first_stage_gives_vector_latents_for_an_mlp_denoiser(tmp_path: Path) -> None:
    vae = [
        "decoder.autoencoder={type: autoencoder, latent_dim: 8, variational: true, "
        "encoder: {type: conv-encoder, channels: 16}, decoder: {type: conv-decoder, channels: 16}}"
    ]
    with pytest.raises(GenzooError, match=r"latent shape \(8,\).*mlp-denoiser"):
        build(vae)
    model, data = train(
        tmp_path,
        vae + ["decoder.diffusion.denoiser={type: mlp-denoiser, hidden: 32, depth: 1}"],
        stages="{autoencoder: 2, decoder: 2}",
    )
    dec = model.components["decoder"]
    assert dec.consumes.shape == (8,) and model.components["prior"].produces.shape == (8,)
    assert abs(dec.encode(data.tensors()["image"]).std().item() - 1) < 0.05  # fitted on the first 1024 (all 96 here)
    x = api.load_model(tmp_path, sampler="ddim", steps=3).sample(2, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all()
