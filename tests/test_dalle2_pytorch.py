"""DALLE2-pytorch's prior and decoder in genzoo (plugins/genzoo_dalle2_pytorch, docs/interop.md), against the library.

Each model is a small random one of the library's, built by its own config classes (DiffusionPriorConfig,
DecoderConfig: a 16-d prior transformer and an 8 px decoder with a 16 px upsampler, T = 50), saved in its format (JSON
configs, a ``torch.save``d state dict and a tracker-style ``{'model': ...}`` save) and imported with `genzoo import`.
The CLIP is a random genzoo ``clip``, lent to the library through a test adapter of its ``BaseClipAdapter``.

dalle2-pytorch pins open-clip-torch < 3, so it is not in .venv: these tests are marked ``interop`` and run by
`make test-interop` in .venv-interop; elsewhere they are skipped (the plugin guard's test runs everywhere).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import gaussian_diffusion, threads

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the library's pydantic v1 idioms

# marks each test but the plugin guard's: make test-interop selects them, and a .venv without the library skips them
needs_library = pytest.mark.skipif(
    importlib.util.find_spec("dalle2_pytorch") is None,
    reason="dalle2-pytorch is installed only in .venv-interop: make test-interop",
)

D, T = 16, 50  # the CLIP's embedding and token width, and every stage's diffusion steps
PRIOR = {
    "net": {"dim": D, "depth": 2, "max_text_len": 16, "num_timesteps": T, "dim_head": 8, "heads": 2},
    "image_embed_dim": D,
    "image_size": 16,
    "timesteps": T,
    "cond_drop_prob": 0.1,
    "predict_x_start": True,
    "beta_schedule": "cosine",
    "condition_on_text_encodings": True,
}
UNET = {"dim": 8, "dim_mults": [1, 2], "cond_dim": 8, "attn_heads": 2, "attn_dim_head": 4, "num_resnet_blocks": 1}
DECODER = {
    "unets": [
        {**UNET, "image_embed_dim": D, "text_embed_dim": D, "cond_on_text_encodings": True, "self_attn": [False, True]},
        {**UNET, "image_embed_dim": D, "resnet_groups": 4},
    ],
    "image_sizes": [8, 16],
    "timesteps": T,
    "learned_variance": [True, False],
}
CLIP = {
    "type": "clip",
    "embed_dim": D,
    "image_tower": {"type": "noisy-classifier", "model_channels": 8, "channel_mult": [1], "attention_resolutions": []},
    "text_tower": {"context": 16, "width": D, "layers": 1, "heads": 2},
}
CAPTIONS = ["a red circle", "a small blue square at the top", "a green triangle"]


def write_source(folder: Path, prior, decoder, *, prior_cfg=PRIOR, decoder_cfg=DECODER) -> Path:
    """The library's format: TrainDiffusionPriorConfig / TrainDecoderConfig-shaped JSON, a state dict (the prior) and
    a tracker's {'model': state dict} save (the decoder)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prior_config.json").write_text(json.dumps({"prior": prior_cfg}))
    (folder / "decoder_config.json").write_text(json.dumps({"decoder": decoder_cfg}))
    # as its trackers save a model: without the CLIP (which the fixture lends the library's prior)
    torch.save({k: v for k, v in prior.state_dict().items() if not k.startswith("clip.")}, folder / "prior_latest.pth")
    torch.save({"model": decoder.state_dict(), "version": "1.15.6"}, folder / "decoder_latest.pth")
    return folder


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """(the library's DiffusionPrior with the genzoo CLIP lent to it, its Decoder, the imported genzoo pipeline, the
    source folder)."""
    from dalle2_pytorch.dalle2_pytorch import BaseClipAdapter, EmbeddedImage, EmbeddedText
    from dalle2_pytorch.train_configs import DecoderConfig, DiffusionPriorConfig

    from genzoo import api

    class GenzooClip(BaseClipAdapter):
        """genzoo's CLIP as DALLE2-pytorch's CLIP: z_t and the token encodings with padding zeroed."""

        dim_latent = property(lambda self: self.clip.embed_dim)
        max_text_len = property(lambda self: self.clip.context_length)
        image_channels = 3

        def embed_text(self, tokens):
            z_t, seq, mask = self.clip.encode_text_sequence(tokens)
            return EmbeddedText(z_t, seq * mask[..., None])

        def embed_image(self, image):
            return EmbeddedImage(self.clip.encode_image(image * 2 - 1), None)

    with threads(1):
        torch.manual_seed(0)
        prior, decoder = DiffusionPriorConfig(**PRIOR).create(), DecoderConfig(**DECODER).create()
        for p in decoder.parameters():  # the library zero-inits its output convolutions: give them weights to test
            if not p.abs().sum():
                p.data.normal_(0, 0.3)
        root = tmp_path_factory.mktemp("dalle2-pytorch")
        source = write_source(root / "source", prior, decoder)
        api.import_model(str(source), root / "run", options={"clip": CLIP})
        model = api.load_model(root / "run")
        prior.clip = GenzooClip(model.components["clip"])
        yield prior.eval(), decoder.eval(), model, source


def text_condition(model, captions=CAPTIONS):
    return model.components["encoder"].encode({"caption": captions})


@pytest.mark.interop
@needs_library
@pytest.mark.parametrize("with_caption", [True, False], ids=["caption", "no-caption"])
def test_the_prior_network_equals_the_library_s_with_its_nulls(imported, with_caption) -> None:
    """The adapter's output equals DiffusionPriorNetwork's to 1e-5; samples marked ``drop`` get its null text and
    image (forward_with_cond_scale's unconditional pass), and no caption is its null text."""
    lib, _, model, _ = imported
    net = model.components["prior"].diffusion_decoder.denoiser
    g = torch.Generator().manual_seed(1)
    text = text_condition(model)
    x, t = torch.randn(3, D, generator=g), torch.tensor([0, 17, T - 1])
    drop = torch.tensor([False, True, False])
    encodings = text["context"] * text["context_mask"][..., None]
    with threads(1), torch.no_grad():
        if with_caption:
            ours = net(x, t, {**text, "drop": drop})
            kwargs = {"text_embed": text["text_emb"], "text_encodings": encodings}
            keep, null = (lib.net(x, t, **kwargs, text_cond_drop_prob=p, image_cond_drop_prob=p) for p in (0.0, 1.0))
            ref = torch.where(drop[:, None], null, keep)
        else:
            ours = net(x, t, {})
            ref = lib.net(x, t, text_embed=torch.zeros_like(x), text_cond_drop_prob=1.0)
    assert (ours - ref).abs().max() < 1e-5
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()  # not two zero outputs


@pytest.mark.interop
@needs_library
def test_each_unet_equals_the_library_s_with_its_nulls_and_low_res_image(imported) -> None:
    """Both stages' U-Nets equal the library's to 1e-5: the first with z_i and the caption, each dropped on its own
    (drop_emb, drop_context) or together (drop); the upsampler with the stage before's image resized as Decoder.sample
    resizes it (nearest, clamped to [0, 1], then to [-1, 1])."""
    from dalle2_pytorch.dalle2_pytorch import normalize_neg_one_to_one, resize_image_to

    _, lib, model, _ = imported
    g = torch.Generator().manual_seed(2)
    text = {k: v.repeat(2, *([1] * (v.dim() - 1))) for k, v in text_condition(model).items()}  # 6 samples
    n = len(text["text_emb"])
    emb = F.normalize(torch.randn(n, D, generator=g), dim=-1)
    drop_emb, drop_context = torch.tensor([0, 1, 0, 1, 0, 0]).bool(), torch.tensor([0, 0, 1, 1, 0, 1]).bool()
    x, t = torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, T, (n,), generator=g)
    encodings = text["context"] * text["context_mask"][..., None]
    base = model.components["decoder"].denoiser
    with threads(1), torch.no_grad():
        ours = base(x, t, {"emb": emb, **text, "drop_emb": drop_emb, "drop_context": drop_context})
        refs = {
            (i, c): lib.unets[0](
                x, t, image_embed=emb, text_encodings=encodings, image_cond_drop_prob=i, text_cond_drop_prob=c
            )
            for i in (0.0, 1.0)
            for c in (0.0, 1.0)
        }
        ref = torch.stack([refs[float(i), float(c)][k] for k, (i, c) in enumerate(zip(drop_emb, drop_context))])
        assert (ours - ref).abs().max() < 1e-5
        both = base(x, t, {"emb": emb, **text, "drop": torch.ones(n, dtype=torch.bool)})
        assert (both - refs[1.0, 1.0]).abs().max() < 1e-5

        low01, x16 = torch.rand(n, 3, 8, 8, generator=g), torch.randn(n, 3, 16, 16, generator=g)
        up = model.components["upsampler_decoder"].denoiser(x16, t, {"low_res": low01 * 2 - 1})
        lowres = normalize_neg_one_to_one(resize_image_to(low01, 16, clamp_range=(0.0, 1.0), nearest=True))
        ref = lib.unets[1](x16, t, image_embed=emb, lowres_cond_img=lowres)
    assert (up - ref).abs().max() < 1e-5
    assert ours.shape == (n, 6, 8, 8) and up.shape == (n, 3, 16, 16)  # learned variance on the first stage only


@pytest.mark.interop
@needs_library
@pytest.mark.parametrize("scale", [1.0, 3.0], ids=["unguided", "cfg-3"])
def test_a_prior_sampling_run_equals_the_library_s_from_the_same_seed(imported, scale) -> None:
    """genzoo's ancestral sampler over all T steps on the imported prior, best of 2 by similarity to z_t, equals
    ``DiffusionPrior.sample`` (its p_sample_loop_ddpm, then the same best-of-2) from the same seed; with CFG too."""
    from genzoo.diffusion.guidance import CFGConfig, ClassifierFreeGuidance

    lib, _, model, _ = imported
    c, text = model.components, text_condition(model)
    guidance = ClassifierFreeGuidance(CFGConfig(scale=scale)) if scale != 1 else None
    with threads(1):
        ours = c["prior"].sample(
            3, text, generator=torch.Generator().manual_seed(3), sampler=c["prior_sampler"], guidance=guidance
        )
        torch.manual_seed(3)
        ref = lib.sample(text["tokens"], num_samples_per_batch=2, cond_scale=scale)
    assert ours.shape == ref.shape == (3, D)
    assert (ours - ref).abs().max() < 1e-4
    assert (ours - ref).abs().max() < 1e-3 * ref.abs().max()


@pytest.mark.interop
@needs_library
def test_a_decoder_sampling_run_equals_the_library_s_stage_by_stage(imported) -> None:
    """The decoder (learned variance, ancestral over T) from z_i and the caption equals ``Decoder.sample`` stopped
    after its first U-Net, and the upsampler from the same low-res image equals ``Decoder.sample`` started at its
    second, each from one seed. (The library also draws, and discards, a noise tensor at t = 0; genzoo draws none, so
    one generator through both stages would be one draw apart from the library's: the stages start from their own.)"""
    _, lib, model, _ = imported
    c, text = model.components, text_condition(model)
    g, text = torch.Generator().manual_seed(4), {k: v[:2] for k, v in text.items()}
    emb = F.normalize(torch.randn(2, D, generator=g), dim=-1)
    encodings = text["context"] * text["context_mask"][..., None]
    with threads(1):
        g = torch.Generator().manual_seed(5)
        x_t = torch.randn(2, 3, 8, 8, generator=g)
        low = c["decoder"].decode(x_t, {"emb": emb, **text}, generator=g, sampler=c["sampler"])
        torch.manual_seed(5)
        ref_low = lib.sample(image_embed=emb, text_encodings=encodings, stop_at_unet_number=1)
        assert ((low + 1) / 2 - ref_low).abs().max() < 1e-4

        high = model.upsample(ref_low * 2 - 1, generator=torch.Generator().manual_seed(6))
        torch.manual_seed(6)
        ref_high = lib.sample(image=ref_low, image_embed=emb, text_encodings=encodings, start_at_unet_number=2)
    assert high.shape == (2, 3, 16, 16)
    assert ((high + 1) / 2 - ref_high).abs().max() < 1e-4
    assert ref_high.std() > 0.05  # a real image, not a clamp of everything to one value


@pytest.mark.interop
@needs_library
def test_the_imported_run_samples_from_a_prompt_through_the_cli(imported, tmp_path, capsys, monkeypatch) -> None:
    """`genzoo import` reads the pickles only through torch.load(weights_only=True), says so, and the run samples
    with `genzoo sample --prompt` like any dalle2 run; the recipe maps the library's process and samplers."""
    from genzoo.cli import main

    _, _, model, source = imported
    real, calls = torch.load, []
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(k.get("weights_only")) or real(*a, **k))
    with threads(1):
        assert main(["import", str(source), str(tmp_path / "run"), "--option", f"clip={json.dumps(CLIP)}"]) == 0
        out = capsys.readouterr()
        assert calls == [True, True] and "torch.load(weights_only=True)" in out.err
        assert "imported" in out.out and "DALLE2-pytorch" in out.out
        assert (
            main(
                [
                    "sample",
                    str(tmp_path / "run"),
                    "--prompt",
                    "a red circle",
                    "-n",
                    "2",
                    "--out",
                    str(tmp_path / "x.png"),
                ]
            )
            == 0
        )
    recipe = json.loads(next((tmp_path / "run").rglob("recipe.json")).read_text())["components"]
    assert recipe["prior"]["diffusion"]["mean_type"] == "x0" and recipe["prior"]["diffusion"]["clip_range"] is None
    assert recipe["prior"]["diffusion"]["schedule"] == "cosine"
    assert (recipe["prior_sampler"]["type"], recipe["prior_sampler"]["steps"]) == ("ddpm", T)
    assert recipe["decoder"]["var_type"] == "learned-range" and recipe["upsampler_decoder"]["var_type"] == "fixed-small"
    assert recipe["upsampler_decoder"]["schedule"] == "linear"  # the library's default for a last upsampler
    assert not list(tmp_path.joinpath("run").rglob("*.pth"))


@pytest.mark.interop
@needs_library
def test_the_library_s_schedules_become_genzoo_s_process() -> None:
    """cosine and linear keep their names (the betas agree in float64), the others come as betas; genzoo's abar then
    equals the library's NoiseScheduler's float32 tables to float32 precision."""
    from dalle2_pytorch.dalle2_pytorch import NoiseScheduler
    from genzoo_dalle2_pytorch.importer import process_fields

    from genzoo.diffusion.schedules import get_named_beta_schedule

    for name in ("cosine", "linear", "quadratic", "sigmoid"):
        for steps in (50, 1000):
            fields = process_fields(name, steps, "beta_schedule")
            assert ("schedule" in fields) == (name in ("cosine", "linear"))
            betas = get_named_beta_schedule(name, steps) if "schedule" in fields else fields["betas"]
            process = gaussian_diffusion(betas=betas)
            lib = NoiseScheduler(beta_schedule=name, timesteps=steps, loss_type="l2")
            for ours, theirs in (("abar", "alphas_cumprod"), ("posterior_mean_coef2", "posterior_mean_coef2")):
                assert abs(torch.as_tensor(process.tables[ours]).float() - getattr(lib, theirs)).max() < 1e-6
    with pytest.raises(Exception, match="beta_schedule' = 'spiral'"):
        process_fields("spiral", 50, "beta_schedule")


@pytest.mark.interop
@needs_library
def test_fewer_sample_timesteps_become_genzoo_s_ddim_and_say_so(imported, tmp_path) -> None:
    """sample_timesteps < T runs the library's DDIM loops (the prior's with eta 1, the decoder's with its
    ddim_sampling_eta 0): the run gets genzoo's DDIM with the same steps and eta, and meta.json names the difference."""
    from genzoo import api

    lib_prior, lib_decoder, _, _ = imported
    source = write_source(
        tmp_path / "source",
        lib_prior,
        lib_decoder,
        prior_cfg={**PRIOR, "sample_timesteps": 10},
        decoder_cfg={**DECODER, "sample_timesteps": [10, None]},
    )
    with threads(1):
        ckpt = api.import_model(str(source), tmp_path / "run", options={"clip": CLIP})
    recipe = json.loads((ckpt / "recipe.json").read_text())["components"]
    steps = {role: (recipe[role]["type"], recipe[role]["steps"], recipe[role].get("eta")) for role in
             ("prior_sampler", "sampler", "upsampler_sampler")}  # fmt: skip
    assert steps == {
        "prior_sampler": ("ddim", 10, 1.0),
        "sampler": ("ddim", 10, 0.0),
        "upsampler_sampler": ("ddpm", T, None),
    }
    notes = json.loads((ckpt / "meta.json").read_text())["imported_from"]["differences"]
    assert sum("sample_timesteps 10" in note for note in notes) == 2


REFUSED = [
    ({"prior": {**PRIOR, "sampling_clamp_l2norm": True}}, "prior.sampling_clamp_l2norm"),
    ({"prior": {**PRIOR, "net": {**PRIOR["net"], "self_cond": True}}}, "prior.net.self_cond"),
    ({"decoder": {**DECODER, "use_noise_for_lowres_cond": True}}, "decoder.use_noise_for_lowres_cond"),
    ({"decoder": {**DECODER, "learned_variance_constrain_frac": True}}, "decoder.learned_variance_constrain_frac"),
    ({"decoder": {**DECODER, "use_dynamic_thres": True, "dynamic_thres_percentile": 0.4}}, "dynamic_thres_percentile"),
    ({"decoder": {**DECODER, "beta_schedule": ["cosine", "spiral"]}}, "rejects the decoder config"),  # the library's
    ({"clip": {"make": "x-clip", "model": "x"}}, "clip.make"),
    ({"pickle": True}, "weights_only=True"),
    ({"no decoder config": True}, "no DALLE2-pytorch decoder config"),
]


@pytest.mark.interop
@needs_library
@pytest.mark.parametrize("change,match", REFUSED, ids=[m for _, m in REFUSED])
def test_what_genzoo_cannot_represent_is_refused_with_its_field(imported, tmp_path, change, match) -> None:
    """One line naming the field (or the file), and no run left behind."""
    from genzoo import api
    from genzoo.errors import GenzooError

    lib_prior, lib_decoder, _, _ = imported
    prior_cfg, decoder_cfg = change.get("prior", PRIOR), change.get("decoder", DECODER)
    source = write_source(tmp_path / "source", lib_prior, lib_decoder, prior_cfg=prior_cfg, decoder_cfg=decoder_cfg)
    if "clip" in change:
        (source / "prior_config.json").write_text(json.dumps({"prior": {**PRIOR, "clip": change["clip"]}}))
    if "pickle" in change:  # an object weights_only will not build
        torch.save({"model": lib_decoder.state_dict(), "when": __import__("datetime").date(2024, 1, 1)},
                   source / "decoder_latest.pth")  # fmt: skip
    if "no decoder config" in change:
        (source / "decoder_config.json").unlink()
    with threads(1), pytest.raises(GenzooError, match=match.replace("[", r"\[").replace("]", r"\]")) as e:
        api.import_model(str(source), tmp_path / "run", options=None if "clip" in change else {"clip": CLIP})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


def test_without_the_extra_the_plugin_says_what_to_install(monkeypatch) -> None:
    """Runs in every environment: without dalle2_pytorch the plugin's load error is the pip line, every other plugin
    loads, and GENZOO_STRICT_PLUGINS does not make the missing extra fatal (a MissingExtra)."""
    import genzoo_dalle2_pytorch

    from genzoo.plugins import load_plugins

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "dalle2_pytorch" else real(name, *a)
    )
    registry, infos = load_plugins(strict=False)
    info = {i.name: i for i in infos}
    assert "pip install 'genzoo[dalle2-pytorch]'" in info["dalle2_pytorch"].error
    assert not info["dalle2_pytorch"].registered and info["dalle2"].error is None
    assert "dalle2" in registry.names("pipeline") and "dalle2-pytorch" not in registry.names("importer")
    _, (alone,) = load_plugins(extra=[("dalle2_pytorch", genzoo_dalle2_pytorch)], entry_points=False, strict=True)
    assert "genzoo[dalle2-pytorch]" in alone.error
