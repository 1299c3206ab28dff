"""The diffusers plugin (docs/interop.md): adapters and `genzoo import`, checked against diffusers itself.

Every model here is a small random diffusers model built in the test and saved with ``save_pretrained``, as
diffusers' own tests do. Whole sampling runs use T = 100 training steps: with T = 1000 a DDIM run starts where
1/sqrt(abar_T) = 158 multiplies every float32 rounding difference of the network (diffusers against itself with
only its memory layout changed differs by 0.09 on a random model), so agreement to 1e-4 would test nothing.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny import fit

diffusers = pytest.importorskip("diffusers")

from genzoo import api  # noqa: E402
from genzoo.checkpoint import load_checkpoint  # noqa: E402
from genzoo.data import DataSpec  # noqa: E402
from genzoo.errors import CheckpointError, GenzooError, OfflineError  # noqa: E402
from genzoo.plugins import default_registry  # noqa: E402

DIGITS = {"type": "digits", "image_size": 8}


pytestmark = pytest.mark.usefixtures("one_thread")


def two_levels(down: tuple, up: tuple, *, size: int = 8, channels=(3, 3), widths=(32, 64), **kw) -> dict:
    """A diffusers U-Net's config at toy size: ``size`` px, (in, out) ``channels``, two levels of ``widths`` channels
    with one layer each, of block types ``down`` and ``up``; ``kw`` over these."""
    io = dict(sample_size=size, in_channels=channels[0], out_channels=channels[1])
    return dict(io, block_out_channels=widths, layers_per_block=1, down_block_types=down, up_block_types=up, **kw)


def ddpm_unet(seed: int = 0, **kw) -> torch.nn.Module:
    """google/ddpm-cifar10-32's layout (attention at the second level, one head, TF padding, sin-first embedding
    with freq_shift 1, GroupNorm eps 1e-6) at 8x8 with one channel and 16/32 widths."""
    torch.manual_seed(seed)
    blocks = ("DownBlock2D", "AttnDownBlock2D"), ("AttnUpBlock2D", "UpBlock2D")
    cfg = two_levels(*blocks, channels=(1, 1), widths=(16, 32), norm_num_groups=8, attention_head_dim=None)
    tf = dict(downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)
    return diffusers.UNet2DModel(**{**cfg, **tf, **kw}).eval()


def unclip_decoder(cross_attention_dim: int = 32) -> torch.nn.Module:
    """unCLIP's decoder U-Net at toy size (Karlo's block types, scale-shift norm, a learned-range variance)."""
    cfg = two_levels(
        ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        ("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        channels=(3, 6),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
        resnet_time_scale_shift="scale_shift",
        class_embed_type="identity",
    )
    return diffusers.UNet2DConditionModel(**cfg).eval()


def prior_transformer(*, dim: int, num_embeddings: int, head_dim: int, layers: int) -> torch.nn.Module:
    """unCLIP's PriorTransformer at toy size."""
    return diffusers.PriorTransformer(
        num_attention_heads=2,
        attention_head_dim=head_dim,
        num_layers=layers,
        embedding_dim=dim,
        num_embeddings=num_embeddings,
        additional_embeddings=4,
    ).eval()


@torch.no_grad()
def random_clip_statistics(prior: torch.nn.Module) -> None:
    """diffusers initialises the prior's CLIP mean and std to 0 and 1, which would hide a missing (un)normalisation."""
    prior.clip_mean.normal_()
    prior.clip_std.uniform_(0.5, 2)


# the text and image towers of the toy CLIPs (transformers' CLIPTextConfig / CLIPVisionConfig fields)
CLIP_TOWER = dict(hidden_size=16, projection_dim=16, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2)
# the encoder and decoder of the toy VQModels and AutoencoderKLs: f = 2 (two levels of 8 and 16), 3-channel latents
VAE_BLOCKS = dict(
    block_out_channels=[8, 16],
    norm_num_groups=8,
    in_channels=3,
    out_channels=3,
    latent_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2,
)


def save_pipeline(path, cls, *, unet=None, **scheduler) -> str:
    pipe = cls(unet=unet if unet is not None else ddpm_unet(), scheduler=diffusers.DDPMScheduler(**scheduler))
    pipe.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {
        "ddim": save_pipeline(
            root / "ddim", diffusers.DDIMPipeline, num_train_timesteps=100, variance_type="fixed_large"
        ),
        "ddpm": save_pipeline(root / "ddpm", diffusers.DDPMPipeline, num_train_timesteps=100),
    }


@pytest.fixture(scope="module")
def runs(folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {
        (kind, adapter): api.import_model(folders[kind], root / f"{kind}-{adapter}", adapter=adapter, data=DIGITS)
        for kind in folders
        for adapter in (False, True)
    }


def images(x: torch.Tensor) -> torch.Tensor:
    """genzoo's [-1, 1] samples as diffusers' pipelines return them (output_type='pt')."""
    return (x / 2 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- networks


@pytest.mark.parametrize(
    "layout",
    [
        {},  # the DDPM layout
        dict(
            attention_head_dim=8,
            downsample_padding=1,
            flip_sin_to_cos=True,
            freq_shift=0,
            norm_eps=1e-5,
            layers_per_block=2,
            block_out_channels=(16, 32, 32),
            down_block_types=("AttnDownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
            up_block_types=("AttnUpBlock2D", "UpBlock2D", "AttnUpBlock2D"),
        ),
    ],
)
def test_native_unet_equals_unet2dmodel(layout) -> None:
    from genzoo_diffusers.native import native_state_dict, native_unet_config

    from genzoo.nn import UNet, UNetConfig

    theirs = ddpm_unet(1, in_channels=3, out_channels=3, **layout)
    cfg, why = native_unet_config(theirs.config)
    assert cfg is not None, why
    ours = UNet(UNetConfig(**cfg)).eval()
    ours.load_state_dict(native_state_dict(theirs.state_dict(), cfg), strict=True)
    x, t = torch.randn(4, 3, 8, 8), torch.tensor([0, 7, 500, 999])
    with torch.no_grad():
        want = theirs(x, t).sample
        assert (ours(x, t) - want).abs().max() < 1e-5
        ours = api.for_inference(ours)  # channels_last, as load_model gives it
        assert (ours(x.contiguous(memory_format=torch.channels_last), t) - want).abs().max() < 1e-5


def test_native_mapping_names_what_differs() -> None:
    from genzoo_diffusers.native import native_unet_config

    cfg, why = native_unet_config(ddpm_unet(resnet_time_scale_shift="scale_shift").config)
    assert cfg is None and "resnet_time_scale_shift" in why


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
@pytest.mark.parametrize("adapter", [False, True])
def test_imported_network_equals_diffusers(folders, runs, kind, adapter) -> None:
    meta = load_checkpoint(runs[kind, adapter]).meta
    assert meta["imported_from"]["unet"] == ("adapter" if adapter else "native")
    denoiser = api.load_model(runs[kind, adapter]).components["decoder"].denoiser
    unet = diffusers.UNet2DModel.from_pretrained(folders[kind], subfolder="unet").eval()
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99])
    with torch.no_grad():
        assert (
            denoiser(x.contiguous(memory_format=torch.channels_last), t, None) - unet(x, t).sample
        ).abs().max() < 1e-5


# --------------------------------------------------------------------------- whole sampling runs


@pytest.mark.parametrize("adapter", [False, True])
def test_ddim_run_equals_ddim_pipeline(folders, runs, adapter) -> None:
    pipe = diffusers.DDIMPipeline.from_pretrained(folders["ddim"])
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=8, generator=torch.Generator().manual_seed(0), output_type="pt").images  # DDIM 50, eta 0
    model = api.load_model(runs["ddim", adapter])
    assert model.components["sampler"].genzoo_spec["steps"] == 50
    got = images(model.sample(8, generator=torch.Generator().manual_seed(0)))
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("adapter", [False, True])
def test_ancestral_run_equals_ddpm_pipeline(folders, runs, adapter) -> None:
    """Both draw x_T and then one noise tensor per step but the last from the same generator, in the same order."""
    pipe = diffusers.DDPMPipeline.from_pretrained(folders["ddpm"])
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        batch_size=8, generator=torch.Generator().manual_seed(0), num_inference_steps=100, output_type="pt"
    ).images
    model = api.load_model(runs["ddpm", adapter])
    got = images(model.sample(8, generator=torch.Generator().manual_seed(0)))
    assert (got - want).abs().max() < 1e-4


def test_respaced_ancestral_run_equals_ddpm_pipeline(folders, runs) -> None:
    """25 of 100 steps: diffusers' leading spacing is genzoo's sampler spacing 'leading'."""
    pipe = diffusers.DDPMPipeline.from_pretrained(folders["ddpm"])
    pipe.set_progress_bar_config(disable=True)
    want = pipe(
        batch_size=4, generator=torch.Generator().manual_seed(3), num_inference_steps=25, output_type="pt"
    ).images
    got = images(api.load_model(runs["ddpm", False], steps=25).sample(4, generator=torch.Generator().manual_seed(3)))
    assert (got - want).abs().max() < 1e-4


def test_every_sampler_runs_on_an_imported_model(runs) -> None:
    registry = default_registry()
    names = [
        n for n in registry.names("sampler") if getattr(registry.build("sampler", n), "kind", None).value == "diffusion"
    ]
    assert {"ddpm", "ddim", "dpm-solver++"} <= set(names)
    for adapter in (False, True):
        for name in names:
            x = api.load_model(runs["ddpm", adapter], sampler=name, steps=8).sample(
                2, generator=torch.Generator().manual_seed(0)
            )
            assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all(), name


def test_classifier_guidance_trained_on_an_imported_ddpm(runs, tmp_path) -> None:
    """A genzoo noisy classifier trained on the imported decoder's own process (--init-from the import), then
    classifier guidance with every diffusion sampler; the imported weights stay as they were."""
    from genzoo.recipes import Recipe, resolve

    run = runs["ddpm", False]
    imported = load_checkpoint(run)
    body = {k: copy.deepcopy(v) for k, v in imported.recipe.items() if k in Recipe.model_fields}
    body["pipeline"] = {"type": "diffusion", "condition": "class"}
    body["components"]["guidance"] = {
        "type": "classifier",
        "scale": 2.0,
        "classifier": {"type": "noisy-classifier", "model_channels": 16, "channel_mult": [1, 2]},
    }
    body["train"] = {"stages": {"decoder": 0, "guidance": 3}, "batch_size": 8, "log_every": 1}
    registry = default_registry()
    resolved = resolve("guided-import", Recipe.model_validate(body), registry)
    source = api.build_data(resolved)
    pipeline = api.create_model(resolved, data_spec=source.spec)
    assert "decoder" in api.init_from(pipeline, resolved, run)
    fit(pipeline, source, resolved, tmp_path)
    trained = load_checkpoint(tmp_path)
    for k, v in imported.components["decoder"].items():
        assert torch.equal(trained.components["decoder"][k], v), k
    for name in ("ddpm", "ddim", "dpm-solver++"):
        model = api.load_model(tmp_path, sampler=name, steps=6)
        guided = model.sample(4, {"y": torch.tensor([0, 1, 2, 3])}, generator=torch.Generator().manual_seed(0))
        plain = api.load_model(tmp_path, sampler=name, steps=6, guidance="none").sample(
            4, generator=torch.Generator().manual_seed(0)
        )
        assert torch.isfinite(guided).all() and (guided - plain).abs().max() > 1e-4, name
        # classifier-free guidance runs too; the imported model ignores its condition, so it changes nothing
        cfg = api.load_model(tmp_path, sampler=name, steps=6, guidance="cfg", scale=3.0)
        assert torch.allclose(cfg.sample(4, generator=torch.Generator().manual_seed(0)), plain, atol=1e-4), name


# --------------------------------------------------------------------------- the scheduler mapping


def test_scheduler_fields_map_onto_the_process() -> None:
    from genzoo_diffusers.scheduler import map_scheduler

    dec, sampler = map_scheduler(
        "DDPMScheduler", {"num_train_timesteps": 1000, "variance_type": "fixed_large"}, ddim=False, steps=1000
    )
    assert (
        dec["schedule"] == "linear"
        and "betas" not in dec
        and dec["var_type"] == "fixed-large"
        and dec["clip_range"] == 1.0
    )
    assert sampler == {"type": "ddpm", "steps": 1000, "spacing": "leading", "steps_offset": 0}
    dec, _ = map_scheduler(
        "DDIMScheduler",
        {"beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction", "clip_sample": False},
        ddim=True,
        steps=50,
    )
    assert dec["schedule"] == "cosine" and dec["mean_type"] == "v" and dec["clip_range"] is None
    dec, sampler = map_scheduler(
        "DDIMScheduler",
        {
            "beta_schedule": "scaled_linear",
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "steps_offset": 1,
            "prediction_type": "sample",
        },
        ddim=True,
        steps=50,
    )
    want = (
        diffusers.DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        .betas.double()
        .numpy()
    )
    assert np.array_equal(np.array(dec["betas"]), want) and dec["mean_type"] == "x0"
    assert sampler["steps_offset"] == 1 and sampler["clipped_eps"] is False and sampler["eta"] == 0.0
    dec, _ = map_scheduler(
        "DDPMScheduler", {"variance_type": "learned_range", "thresholding": True}, ddim=False, steps=1000
    )
    assert dec["var_type"] == "learned-range" and dec["loss"] == "hybrid" and dec["clip_range"] == 1.0


@pytest.mark.parametrize(
    "cls, fields, ddim, named",
    [
        ("DDPMScheduler", {"variance_type": "learned"}, False, "variance_type"),
        ("DDPMScheduler", {"thresholding": True, "sample_max_value": 2.0}, False, "thresholding"),
        ("DDPMScheduler", {"rescale_betas_zero_snr": True}, False, "rescale_betas_zero_snr"),
        ("DDPMScheduler", {"steps_offset": 1}, False, "steps_offset"),
        ("DDIMScheduler", {"set_alpha_to_one": False}, True, "set_alpha_to_one"),
        ("DDIMScheduler", {"timestep_spacing": "linspace"}, True, "timestep_spacing"),
        ("PNDMScheduler", {}, True, "PNDMScheduler"),
    ],
)
def test_unrepresentable_scheduler_is_refused_naming_the_field(cls, fields, ddim, named) -> None:
    from genzoo_diffusers.scheduler import map_scheduler

    with pytest.raises(GenzooError, match=named):
        map_scheduler(cls, {"num_train_timesteps": 1000, **fields}, ddim=ddim, steps=50)


def test_genzoo_import_refuses_an_unrepresentable_scheduler_in_one_line(tmp_path, capsys) -> None:
    from genzoo.cli import main

    folder = save_pipeline(tmp_path / "p", diffusers.DDPMPipeline, num_train_timesteps=100, variance_type="learned")
    assert main(["import", folder, str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("genzoo import: error: scheduler field 'variance_type' = 'learned'") and "\n" not in err
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- safety, offline, plugin loading


def test_bin_weights_are_refused_and_nothing_is_unpickled(tmp_path, monkeypatch, capsys) -> None:
    from genzoo.cli import main

    pipe = diffusers.DDPMPipeline(unet=ddpm_unet(), scheduler=diffusers.DDPMScheduler(num_train_timesteps=100))
    pipe.save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert list((tmp_path / "bin" / "unet").glob("*.bin")) and not list(
        (tmp_path / "bin" / "unet").glob("*.safetensors")
    )

    def no_unpickling(*args, **kwargs):
        raise AssertionError("genzoo import unpickled a file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(
        CheckpointError, match=r"only pickled weights \(diffusion_pytorch_model.bin\).*safe_serialization=True"
    ):
        api.import_model(tmp_path / "bin", tmp_path / "run")
    assert main(["import", str(tmp_path / "bin"), str(tmp_path / "run")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    pipe.save_pretrained(str(tmp_path / "st"))  # the same pipeline as safetensors imports with torch.load unusable
    api.import_model(tmp_path / "st", tmp_path / "run", data=DIGITS)


def test_a_hub_id_offline_fails_with_one_line_saying_how_to_work_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1 and a local folder") as e:
        api.import_model("google/ddpm-cifar10-32", tmp_path / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(OfflineError, match="HF_HUB_OFFLINE=1"):
        default_registry().build(
            "network", {"type": "diffusers-unet2d", "pretrained": "google/ddpm-cifar10-32", "subfolder": "unet"}
        )


def test_without_diffusers_the_plugin_reports_its_load_error_and_the_rest_loads(monkeypatch) -> None:
    import importlib.util

    from genzoo.plugins import load_plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    registry, infos = load_plugins(strict=False)
    info = {i.name: i for i in infos}
    assert "pip install 'genzoo[diffusers]'" in info["diffusers"].error and not info["diffusers"].registered
    # the rest load, but for optional plugins whose own extra is not installed in this environment
    assert all(i.error is None or "pip install 'genzoo[" in i.error for name, i in info.items()), info
    assert "ddim" in registry.names("sampler") and "diffusers" not in registry.names("importer")


# --------------------------------------------------------------------------- the CLI on an imported run


def test_cli_import_sample_eval_compare(folders, tmp_path, capsys, cheap_judges) -> None:
    from safetensors.torch import load_file

    from genzoo.cli import main

    run = tmp_path / "run"
    assert main(["import", folders["ddim"], str(run), "--data", "{type: digits, image_size: 8}"]) == 0
    assert "DDIMPipeline, native" in capsys.readouterr().out
    assert (
        main(
            [
                "sample",
                str(run),
                "-n",
                "4",
                "--out",
                str(tmp_path / "grid.png"),
                "--save",
                str(tmp_path / "x.safetensors"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    x = load_file(str(tmp_path / "x.safetensors"))["samples"]
    want = api.load_model(run).sample(4, generator=torch.Generator().manual_seed(0))
    assert x.shape == (4, 1, 8, 8) and torch.allclose(x, want)
    capsys.readouterr()
    assert (
        main(["eval", str(run), "--metrics", "fd", "--samples", "64", "--steps", "5", "--json", "--device", "cpu"]) == 0
    )
    assert np.isfinite(json.loads(capsys.readouterr().out)["fd"])
    out = tmp_path / "cmp"  # compare takes a run directory in place of a recipe, with a sampler swap too
    assert main(["compare", str(run), f"{run}@ddpm:5", "--out", str(out), "--samples", "32", "--metrics", "fd"]) == 0
    rows = json.loads((out / "leaderboard.json").read_text())["rows"]
    assert len(rows) == 2 and not any(r["error"] for r in rows) and all(np.isfinite(r["fd"]) for r in rows)
    assert main(["import", folders["ddim"], str(run)]) == 2  # an existing run is never overwritten


# --------------------------------------------------------------------------- the other adapters


def test_unet2d_condition_adapter_with_unclip_text_projection(tmp_path) -> None:
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    torch.manual_seed(0)
    unet = unclip_decoder()
    proj = UnCLIPTextProjModel(
        clip_embeddings_dim=16, time_embed_dim=128, cross_attention_dim=32, clip_extra_context_tokens=2
    ).eval()
    with torch.no_grad():
        proj.learned_classifier_free_guidance_embeddings.normal_()
    unet.save_pretrained(str(tmp_path / "unet"))
    proj.save_pretrained(str(tmp_path / "text_proj"))
    net = (
        default_registry()
        .build(
            "network",
            {
                "type": "diffusers-unet2d-condition",
                "pretrained": str(tmp_path),
                "subfolder": "unet",
                "text_proj_subfolder": "text_proj",
            },
        )
        .eval()
    )
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 900])
    emb, text_emb, states = torch.randn(2, 16), torch.randn(2, 16), torch.randn(2, 5, 16)
    mask, drop = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool), torch.tensor([False, True])
    with torch.no_grad():
        got = net(x, t, {"emb": emb, "text_emb": text_emb, "context": states, "context_mask": mask, "drop_emb": drop})
        emb = torch.where(drop[:, None], proj.learned_classifier_free_guidance_embeddings, emb)
        ctx, add = proj(
            image_embeddings=emb,
            prompt_embeds=text_emb,
            text_encoder_hidden_states=states,
            do_classifier_free_guidance=False,
        )
        want = unet(
            x,
            t,
            encoder_hidden_states=ctx,
            class_labels=add,
            attention_mask=torch.nn.functional.pad(mask, (2, 0), value=True),
        ).sample
    assert got.shape == (2, 6, 8, 8) and (got - want).abs().max() < 1e-5


def test_unet2d_condition_adapter_for_latent_diffusion() -> None:
    torch.manual_seed(0)
    cfg = two_levels(("CrossAttnDownBlock2D", "DownBlock2D"), ("UpBlock2D", "CrossAttnUpBlock2D"), channels=(4, 4))
    unet = diffusers.UNet2DConditionModel(**cfg, cross_attention_dim=16).eval()
    net = (
        default_registry().build("network", {"type": "diffusers-unet2d-condition", "config": dict(unet.config)}).eval()
    )
    net.model.load_state_dict(unet.state_dict())
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 7, 16)
    with torch.no_grad():
        assert (net(x, t, {"context": ctx}) - unet(x, t, encoder_hidden_states=ctx).sample).abs().max() < 1e-5


def test_prior_transformer_adapter(tmp_path) -> None:
    torch.manual_seed(0)
    prior = prior_transformer(dim=8, num_embeddings=7, head_dim=4, layers=2)
    random_clip_statistics(prior)
    prior.save_pretrained(str(tmp_path))
    net = (
        default_registry().build("network", {"type": "diffusers-prior-transformer", "pretrained": str(tmp_path)}).eval()
    )
    x, t, text_emb, states = torch.randn(3, 8), torch.tensor([0, 10, 999]), torch.randn(3, 8), torch.randn(3, 7, 8)
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        got = net(x, t, {"text_emb": text_emb, "context": states, "context_mask": mask})
        want = prior(
            x, t, proj_embedding=text_emb, encoder_hidden_states=states, attention_mask=mask
        ).predicted_image_embedding
        assert (got - want).abs().max() < 1e-5
        assert torch.equal(net.unnormalize(got), prior.post_process_latents(want))


def test_vqmodel_and_autoencoder_kl_decoders(tmp_path) -> None:
    torch.manual_seed(0)
    vq = diffusers.VQModel(**VAE_BLOCKS, num_vq_embeddings=16).eval()
    kl = diffusers.AutoencoderKL(**{**VAE_BLOCKS, "latent_channels": 4}).eval()
    vq.save_pretrained(str(tmp_path / "vqvae"))
    registry, spec = default_registry(), DataSpec(name="imported", image_shape=(3, 16, 16))
    dec = registry.build(
        "decoder", {"type": "diffusers-vqmodel", "pretrained": str(tmp_path), "subfolder": "vqvae"}, data=spec
    ).eval()
    ae = registry.build("decoder", {"type": "diffusers-autoencoder-kl", "config": dict(kl.config)}, data=spec).eval()
    ae.model.load_state_dict(kl.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = vq.encode(x).latents
        assert dec.consumes.shape == (3, 8, 8) and torch.equal(dec.encode_image(x), z)
        assert (dec.decode(z) - vq.decode(z).sample).abs().max() < 1e-5
        assert (dec.decode_codes(dec.encode_codes(x)) - vq.decode(z).sample).abs().max() < 1e-5
        s = kl.config.scaling_factor
        assert (
            ae.consumes.shape == (4, 8, 8)
            and (ae.encode_image(x) - s * kl.encode(x).latent_dist.mode()).abs().max() < 1e-6
        )
        w = torch.randn(2, 4, 8, 8)
        assert (ae.decode(w) - kl.decode(w / s).sample).abs().max() < 1e-5
