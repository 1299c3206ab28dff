"""`genzoo import` of diffusers' LDMPipeline and UnCLIPPipeline (docs/interop.md), checked against diffusers itself.

Every pipeline is small and random, built here and saved with ``save_pretrained``; the schedulers run T = 100
training steps, for the reason tests/test_diffusers.py gives (at T = 1000 the float32 rounding of a random network
is amplified past any tolerance that would test the mapping).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

import test_diffusers  # noqa: E402  the DDPM U-Net builder

from genzoo import api  # noqa: E402
from genzoo.checkpoint import load_checkpoint  # noqa: E402
from genzoo.interfaces import missing_latent_interface  # noqa: E402
from genzoo.plugins import default_registry  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def nhwc(x: torch.Tensor) -> np.ndarray:
    """genzoo's [-1, 1] samples as diffusers' pipelines return them with output_type='np'."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ddpm_unet(seed: int = 0, **kw) -> torch.nn.Module:
    """DDPM's layout (genzoo's U-Net natively) at 8x8 with three channels: test_diffusers' builder."""
    return test_diffusers.ddpm_unet(seed, **{"in_channels": 3, "out_channels": 3, **kw})


# --------------------------------------------------------------------------- LDMPipeline


def vqmodel(seed: int = 1, **kw) -> torch.nn.Module:
    """A VQModel with f = 2 (two levels), 3-channel latents, 16 codes, and a scaling factor that is not 1."""
    torch.manual_seed(seed)
    cfg = dict(test_diffusers.VAE_BLOCKS, num_vq_embeddings=16, scaling_factor=0.7)
    return diffusers.VQModel(**{**cfg, **kw}).eval()


@pytest.fixture(scope="module")
def ldm(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldm")
    pipe = diffusers.LDMPipeline(
        vqvae=vqmodel(),
        unet=ddpm_unet(),
        scheduler=diffusers.DDIMScheduler(num_train_timesteps=100, clip_sample=False),
    )
    pipe.save_pretrained(str(root / "pipe"))
    runs = {a: api.import_model(root / "pipe", root / f"run-{a}", adapter=a) for a in (False, True)}
    return root / "pipe", runs


def test_vqmodel_adapter_has_the_latent_interface() -> None:
    from genzoo.data import DataSpec

    vq = vqmodel()
    dec = default_registry().build(
        "decoder", {"type": "diffusers-vqmodel", "config": dict(vq.config)}, data=DataSpec("x", (3, 16, 16))
    )
    dec.model.load_state_dict(vq.state_dict())
    assert missing_latent_interface(dec) == [] and dec.latent_shape == (3, 8, 8)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        z = dec.encode_latents(x)
        assert torch.equal(z, vq.encode(x).latents)
        assert (dec.decode_latents(z) - vq.decode(z).sample).abs().max() < 1e-6  # quantised: VQModel.decode's default


def test_ldm_import_is_the_latent_diffusion_composition(ldm) -> None:
    folder, runs = ldm
    ckpt = load_checkpoint(runs[False])
    dec = ckpt.recipe["components"]["decoder"]
    assert ckpt.recipe["pipeline"]["type"] == "latent-diffusion" and dec["type"] == "latent-diffusion"
    assert dec["autoencoder"]["type"] == "diffusers-vqmodel" and dec["scale_factor"] == pytest.approx(0.7)
    assert dec["diffusion"]["denoiser"]["type"] == "unet" and dec["diffusion"]["clip_range"] is None
    sampler = ckpt.recipe["components"]["sampler"]
    assert sampler["type"] == "ddim" and sampler["steps"] == 50
    assert ckpt.meta["imported_from"]["pipeline"] == "LDMPipeline"
    assert load_checkpoint(runs[True]).recipe["components"]["decoder"]["diffusion"]["denoiser"]["type"] == (
        "diffusers-unet2d"
    )
    model = api.load_model(runs[False])
    assert model.stages == ("decoder",)  # the imported first stage has no training_losses: it stays frozen
    assert model.components["decoder"].produces.shape == (3, 16, 16)


@pytest.mark.parametrize("adapter", [False, True])
def test_ldm_run_equals_ldm_pipeline(ldm, adapter) -> None:
    """The same initial latents (x_T from the same generator), DDIM 50 with eta 0, then vqvae.decode(z / s)."""
    folder, runs = ldm
    pipe = diffusers.LDMPipeline.from_pretrained(str(folder))
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="np").images
    got = nhwc(api.load_model(runs[adapter]).sample(4, generator=torch.Generator().manual_seed(0)))
    assert got.shape == want.shape == (4, 16, 16, 3)
    assert np.abs(got - want).max() < 1e-4


def test_every_sampler_and_cfg_run_on_the_imported_ldm(ldm) -> None:
    _, runs = ldm
    registry = default_registry()
    names = [n for n in registry.names("sampler") if registry.build("sampler", n).kind.value == "diffusion"]
    for name in names:
        x = api.load_model(runs[False], sampler=name, steps=6).sample(2, generator=torch.Generator().manual_seed(0))
        assert x.shape == (2, 3, 16, 16) and torch.isfinite(x).all() and x.abs().max() <= 1, name
    plain = api.load_model(runs[False], steps=6).sample(2, generator=torch.Generator().manual_seed(0))
    cfg = api.load_model(runs[False], steps=6, guidance="cfg", scale=3.0)  # unconditional: CFG changes nothing
    assert torch.allclose(cfg.sample(2, generator=torch.Generator().manual_seed(0)), plain, atol=1e-5)


def test_ldm_from_the_command_line(ldm, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    from genzoo.cli import main

    folder, _ = ldm
    run = tmp_path / "run"
    assert main(["import", str(folder), str(run)]) == 0
    assert "LDMPipeline, native" in capsys.readouterr().out
    out = ["--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "x.safetensors"), "--device", "cpu"]
    assert main(["sample", str(run), "-n", "2", *out]) == 0
    x = load_file(str(tmp_path / "x.safetensors"))["samples"]
    assert torch.allclose(x, api.load_model(run).sample(2, generator=torch.Generator().manual_seed(0)))


def test_ldm_whose_vqmodel_does_not_fit_the_unet_is_refused(tmp_path) -> None:
    from genzoo.errors import GenzooError

    pipe = diffusers.LDMPipeline(
        vqvae=vqmodel(latent_channels=4), unet=ddpm_unet(), scheduler=diffusers.DDIMScheduler(num_train_timesteps=100)
    )
    pipe.save_pretrained(str(tmp_path / "pipe"))
    with pytest.raises(GenzooError, match="latents have 4 channels but the UNet2DModel takes 3"):
        api.import_model(tmp_path / "pipe", tmp_path / "run")
    assert not (tmp_path / "run").exists()


# --------------------------------------------------------------------------- UnCLIPPipeline (Karlo)

CAPTIONS = ["a cab", "a red circle at the top"]


def tiny_tokenizer(length: int = 10):
    """A byte-level CLIP BPE over the 256 byte symbols and a few merges (no network: the tiny tokenizers diffusers'
    own tests download are not reachable here)."""
    import transformers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    merges = [("a", "b"), ("c", "a"), ("ca", "b</w>"), ("r", "e"), ("re", "d</w>")]
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return transformers.CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, model_max_length=length)


def unclip_parts(seed: int = 0) -> dict:
    """UnCLIPPipeline's ten parts at toy sizes (diffusers' tests/pipelines/unclip layout): 16-d CLIP, an 8x8
    decoder with a learned-range variance, 16x16 super-resolution; schedulers as Karlo's, with T = 100. Captions are
    10 tokens: with 12, the 4 + 12 context tokens equal the 4x4 grid's 16 and diffusers' AttnAddedKVProcessor skips
    padding its mask (prepare_attention_mask compares the two lengths) and fails."""
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    text = transformers.CLIPTextModelWithProjection(
        transformers.CLIPTextConfig(
            vocab_size=len(tok),
            **test_diffusers.CLIP_TOWER,
            max_position_embeddings=10,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
    ).eval()
    prior = test_diffusers.prior_transformer(dim=16, num_embeddings=10, head_dim=8, layers=1)
    proj = UnCLIPTextProjModel(
        clip_embeddings_dim=16, time_embed_dim=128, cross_attention_dim=32, clip_extra_context_tokens=4
    ).eval()
    test_diffusers.random_clip_statistics(prior)
    with torch.no_grad():  # a parameter diffusers initialises to zeros, made to matter
        proj.learned_classifier_free_guidance_embeddings.normal_()
    decoder = test_diffusers.unclip_decoder()

    def super_res() -> torch.nn.Module:
        resnets = ("ResnetDownsampleBlock2D",) * 2, ("ResnetUpsampleBlock2D",) * 2
        return diffusers.UNet2DModel(**test_diffusers.two_levels(*resnets, size=16, channels=(6, 3))).eval()

    sched = diffusers.UnCLIPScheduler
    return dict(
        prior=prior,
        decoder=decoder,
        text_encoder=text,
        tokenizer=tok,
        text_proj=proj,
        super_res_first=super_res(),
        super_res_last=super_res(),
        prior_scheduler=sched(
            num_train_timesteps=100, variance_type="fixed_small_log", prediction_type="sample", clip_sample_range=5.0
        ),
        decoder_scheduler=sched(num_train_timesteps=100, variance_type="learned_range", prediction_type="epsilon"),
        super_res_scheduler=sched(num_train_timesteps=100, variance_type="fixed_small_log", prediction_type="epsilon"),
    )


def consistent_betas(scheduler):
    """``scheduler`` without the float32 quirk genzoo does not copy: UnCLIPScheduler steps between neighbours t and
    t - 1, and from t = 0 to abar = 1 (its last step), with its stored float32 beta_t, while abar is the float32
    cumulative product of 1 - beta, so beta_t != 1 - abar_t / abar_(t-1) and its last step returns
    beta_0 / (1 - abar_0) x0_hat instead of x0_hat (1 + 1.4e-5 at T = 100; 1 - 5.3e-4 at Karlo's T = 1000).
    Here every beta is 1 - abar_t / abar_(t-1), the process genzoo runs (its abar is the same float32 product)."""
    a = scheduler.alphas_cumprod
    scheduler.betas = 1 - a / torch.cat([a.new_ones(1), a[:-1]])
    scheduler.alphas = 1 - scheduler.betas
    return scheduler


@pytest.fixture(scope="module")
def unclip(tmp_path_factory):
    root = tmp_path_factory.mktemp("unclip")
    pipe = diffusers.UnCLIPPipeline(**unclip_parts())  # the reference (this diffusers cannot reload text_proj)
    pipe.save_pretrained(str(root / "pipe"))
    run = api.import_model(root / "pipe", root / "run")
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        consistent_betas(getattr(pipe, name))
    pipe.set_progress_bar_config(disable=True)
    return root / "pipe", run, pipe


def test_unclip_import_is_the_dalle2_pipeline(unclip) -> None:
    _, run, _ = unclip
    ckpt = load_checkpoint(run)
    c = ckpt.recipe["components"]
    assert ckpt.recipe["pipeline"]["type"] == "dalle2" and c["clip"]["type"] == "diffusers-clip"
    assert c["prior"]["type"] == "diffusers-unclip-prior" and c["prior_guidance"] == {"type": "cfg", "scale": 4.0}
    assert c["decoder"]["var_type"] == "learned-range" and c["guidance"] == {"type": "cfg", "scale": 8.0}
    assert c["upsampler_decoder"]["last_step_denoiser"]["type"] == "diffusers-unet2d"
    assert [c[r]["steps"] for r in ("prior_sampler", "sampler", "upsampler_sampler")] == [25, 25, 7]
    assert all(c[r]["type"] == "ddpm" and c[r]["spacing"] == "even" for r in ("prior_sampler", "sampler"))
    model = api.load_model(run)
    assert model.stages == ("prior", "decoder", "upsampler") and model.image_size == 16


def unclip_images(pipe, seed: int, scales: tuple[float, float]) -> np.ndarray:
    prior_scale, scale = scales
    return pipe(
        prompt=CAPTIONS,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        prior_guidance_scale=prior_scale,
        decoder_guidance_scale=scale,
    ).images


def test_unclip_run_equals_unclip_pipeline(unclip) -> None:
    """End to end from the same generator (prior, decoder with its learned range, super-resolution whose last step
    is super_res_last), float32: without CFG (diffusers at scales 1, 1; genzoo with both guidances swapped out)
    within 1e-4 (3e-5 measured over 5 seeds)."""
    _, run, pipe = unclip
    want = unclip_images(pipe, 0, (1.0, 1.0))
    model = api.load_model(run, guidance="none", prior_guidance="none")
    got = nhwc(model.sample(2, {"caption": CAPTIONS}, generator=torch.Generator().manual_seed(0)))
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("scales", [(4.0, 8.0), (2.0, 3.0)])
def test_unclip_run_with_cfg_follows_unclip_pipeline(unclip, scales) -> None:
    """With CFG on the prior and the decoder (diffusers' defaults 4 and 8, and 2 and 3), float32, end to end: within
    1e-3 (5e-5 to 3.4e-4 measured over 5 seeds). The first step of each cosine chain divides the network's float32
    rounding by sqrt(abar_T) (1/2000 at T = 100) and the guidance scale multiplies it; the float64 test below shows
    each stage exact."""
    _, run, pipe = unclip
    want = unclip_images(pipe, 0, scales)
    got = api.load_model(run, prior_scale=scales[0], scale=scales[1]).sample(
        2, {"caption": CAPTIONS}, generator=torch.Generator().manual_seed(0)
    )
    assert np.abs(nhwc(got) - want).max() < 1e-3


class float64:
    """Default dtype float64 inside the block (diffusers then draws float64 noise, as genzoo's stages do)."""

    def __enter__(self):
        self.before = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)

    def __exit__(self, *exc):
        torch.set_default_dtype(self.before)


def reference_prior(pipe, text, g, scale, steps=25):
    """UnCLIPPipeline.__call__'s prior loop, given the caption's encoding and the generator."""
    n, cfg = len(text[0]), scale > 1
    emb, hid, mask = with_uncond(pipe, text, cfg)
    s = pipe.prior_scheduler
    loop = schedule(s, steps)
    x = torch.randn((n, pipe.prior.config.embedding_dim), generator=g)
    for _, t, prev in loop:
        both = torch.cat([x] * 2) if cfg else x
        out = pipe.prior(both, t, proj_embedding=emb, encoder_hidden_states=hid, attention_mask=mask)
        out = out.predicted_image_embedding
        if cfg:
            u, c = out.chunk(2)
            out = u + scale * (c - u)
        x = s.step(out, timestep=t, sample=x, generator=g, prev_timestep=prev).prev_sample
    return pipe.prior.post_process_latents(x)


def reference_decoder(pipe, z_i, text, g, scale, steps=25):
    """UnCLIPPipeline.__call__'s decoder loop (text projection, CFG on the eps half, learned range)."""
    cfg = scale > 1
    emb, hid, mask = with_uncond(pipe, text, cfg)
    hid, add = pipe.text_proj(
        image_embeddings=z_i, prompt_embeds=emb, text_encoder_hidden_states=hid, do_classifier_free_guidance=cfg
    )
    mask = torch.nn.functional.pad(mask, (pipe.text_proj.clip_extra_context_tokens, 0), value=True)
    s = pipe.decoder_scheduler
    loop = schedule(s, steps)
    size = pipe.decoder.config.sample_size
    x = torch.randn((len(z_i), 3, size, size), generator=g)
    for _, t, prev in loop:
        both = torch.cat([x] * 2) if cfg else x
        out = pipe.decoder(both, t, encoder_hidden_states=hid, class_labels=add, attention_mask=mask).sample
        if cfg:
            u, c = out.chunk(2)
            (u, _), (c, v) = u.split(3, dim=1), c.split(3, dim=1)
            out = torch.cat([u + scale * (c - u), v], dim=1)
        x = s.step(out, t, x, prev_timestep=prev, generator=g).prev_sample
    return x.clamp(-1, 1)


def reference_super_res(pipe, low, g, steps=7):
    """UnCLIPPipeline.__call__'s super-resolution loop: super_res_first, then super_res_last for the last step."""
    s = pipe.super_res_scheduler
    loop = schedule(s, steps)
    size = pipe.super_res_first.config.sample_size
    x = torch.randn((len(low), 3, size, size), generator=g)
    up = torch.nn.functional.interpolate(low, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    for i, t, prev in loop:
        unet = pipe.super_res_last if i == len(loop) - 1 else pipe.super_res_first
        eps = unet(sample=torch.cat([x, up], dim=1), timestep=t).sample
        x = s.step(eps, t, x, prev_timestep=prev, generator=g).prev_sample
    return x


def schedule(s, steps):
    """``steps`` timesteps of scheduler ``s`` as UnCLIPPipeline walks them: (i, t, the next t, None after the last)."""
    s.set_timesteps(steps)
    return [(i, t, None if i + 1 == len(s.timesteps) else s.timesteps[i + 1]) for i, t in enumerate(s.timesteps)]


def with_uncond(pipe, text, cfg: bool):
    """The caption's (embeddings, hidden states, mask), after the empty caption's for classifier-free guidance."""
    return tuple(torch.cat([u, c]) for u, c in zip(uncond(pipe, len(text[0])), text)) if cfg else text


def uncond(pipe, n):
    ids = pipe.tokenizer(
        [""] * n, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    out = pipe.text_encoder(ids.input_ids)
    return out.text_embeds, out.last_hidden_state, ids.attention_mask.bool()


@pytest.fixture(scope="module")
def unclip64(tmp_path_factory):
    """The same layout built, imported and loaded in float64, the reference schedulers' tables in float64 too."""
    root = tmp_path_factory.mktemp("unclip64")
    with float64():
        pipe = diffusers.UnCLIPPipeline(**unclip_parts(seed=1))
        pipe.save_pretrained(str(root / "pipe"))
        model = api.load_model(api.import_model(root / "pipe", root / "run"))
    for name in ("prior_scheduler", "decoder_scheduler", "super_res_scheduler"):
        s = getattr(pipe, name)
        s.alphas_cumprod, s.one = s.alphas_cumprod.double(), s.one.double()  # the float32 products, as genzoo's abar
        consistent_betas(s)
    return pipe, model


# super-resolution has no guided case: UnCLIPPipeline's super-resolution stage is unguided
@pytest.mark.parametrize(
    ("stage", "guided"),
    [("prior", False), ("prior", True), ("decoder", False), ("decoder", True), ("super_res", False)],
)
def test_each_unclip_stage_equals_diffusers_in_float64(unclip64, stage, guided) -> None:
    """Stage by stage from the same inputs and generator: the prior's embeddings (CFG 4), the decoder's images from
    the same z_i and latents (CFG 8, learned range), the super-resolution from the same low-res images (its last
    step super_res_last; no guidance there, as in diffusers). In float64 the mapping is exact to rounding."""
    pipe, model = unclip64
    c = model.components
    with float64(), torch.no_grad():
        tokens = c["clip"].tokenize(CAPTIONS)
        z_t, hid, mask = c["clip"].encode_text_sequence(tokens)
        ids = pipe.tokenizer(CAPTIONS, padding="max_length", max_length=10, truncation=True, return_tensors="pt")
        ref = pipe.text_encoder(ids.input_ids)
        assert torch.equal(mask, ids.attention_mask.bool()) and (z_t - ref.text_embeds).abs().max() < 1e-12
        text = (z_t, hid, mask)
        cond = {"text_emb": z_t, "context": hid, "context_mask": mask}
        z_i = reference_prior(pipe, text, torch.Generator().manual_seed(1), 1.0)
        if stage == "prior":
            want = reference_prior(pipe, text, torch.Generator().manual_seed(2), 4.0 if guided else 1.0)
            got = c["prior"].sample(
                2,
                cond,
                generator=torch.Generator().manual_seed(2),
                sampler=c["prior_sampler"],
                guidance=c["prior_guidance"] if guided else None,
            )
        elif stage == "decoder":
            want = reference_decoder(pipe, z_i, text, torch.Generator().manual_seed(3), 8.0 if guided else 1.0)
            g = torch.Generator().manual_seed(3)
            x_t = torch.randn((2, 3, 8, 8), generator=g)
            got = (
                c["decoder"]
                .decode(
                    x_t,
                    {"emb": z_i, **cond},
                    generator=g,
                    sampler=c["sampler"],
                    guidance=c["guidance"] if guided else None,
                )
                .clamp(-1, 1)
            )
        else:
            low = reference_decoder(pipe, z_i, text, torch.Generator().manual_seed(3), 1.0)
            want = reference_super_res(pipe, low, torch.Generator().manual_seed(4))
            got = model.upsample(low, generator=torch.Generator().manual_seed(4))
    assert got.dtype == torch.float64 and (got - want).abs().max() < 1e-9


def test_the_float32_beta_quirk_is_the_only_difference(unclip64) -> None:
    """With diffusers' own UnCLIPScheduler (the quirk kept: its tables as it makes them, in float64 arithmetic), the
    super-resolution stage is genzoo's with the last step's x0_hat scaled by beta_0 / (1 - abar_0)."""
    pipe, model = unclip64
    kept = pipe.super_res_scheduler
    s = diffusers.UnCLIPScheduler.from_config(kept.config)
    s.betas, s.alphas, s.alphas_cumprod, s.one = (
        s.betas.double(),
        s.alphas.double(),
        s.alphas_cumprod.double(),
        s.one.double(),
    )
    factor = float(s.betas[0] / (1 - s.alphas_cumprod[0]))
    pipe.super_res_scheduler = s
    try:
        with float64(), torch.no_grad():
            low = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * 2 - 1
            want = reference_super_res(pipe, low, torch.Generator().manual_seed(4))
            got = model.upsample(low, generator=torch.Generator().manual_seed(4))
    finally:
        pipe.super_res_scheduler = kept
    assert 1e-6 < abs(factor - 1) < 1e-4 and (got - want).abs().max() > 1e-6
    assert (got * factor - want).abs().max() < 1e-9


def test_unclip_from_the_command_line_with_a_prompt(unclip, tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    from genzoo.cli import main

    folder, _, _ = unclip
    run = tmp_path / "run"
    assert main(["import", str(folder), str(run)]) == 0
    assert "UnCLIPPipeline, adapter" in capsys.readouterr().out
    out = ["--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "x.safetensors"), "--device", "cpu"]
    assert (
        main(
            [
                "sample",
                str(run),
                "--prompt",
                "a red cab",
                "-n",
                "2",
                "--steps",
                "5",
                "--prior-steps",
                "4",
                "--upsampler-steps",
                "3",
                *out,
            ]
        )
        == 0
    )
    x = load_file(str(tmp_path / "x.safetensors"))["samples"]
    want = api.load_model(run, steps=5, prior_steps=4, upsampler_steps=3).sample(
        2, {"caption": ["a red cab"] * 2}, generator=torch.Generator().manual_seed(0)
    )
    assert x.shape == (2, 3, 16, 16) and torch.allclose(x, want)
    with pytest.raises(Exception, match="no image tower"):  # UnCLIPPipeline has no image encoder: no variations
        api.load_model(run).variations(torch.zeros(1, 3, 16, 16), 2)


def test_every_sampler_and_guidance_runs_on_the_imported_unclip(unclip) -> None:
    """Each diffusion sampler on each stage (the super-resolution's last model evaluation, wherever the sampler puts
    it, is super_res_last's), and CFG swapped in on the prior and the decoder of a run imported without it."""
    _, run, _ = unclip
    registry = default_registry()
    names = [n for n in registry.names("sampler") if registry.build("sampler", n).kind.value == "diffusion"]
    for name in names:
        model = api.load_model(
            run, sampler=name, steps=4, prior_sampler=name, prior_steps=4, upsampler_sampler=name, upsampler_steps=3
        )
        x = model.sample(1, {"caption": CAPTIONS[:1]}, generator=torch.Generator().manual_seed(0))
        assert x.shape == (1, 3, 16, 16) and torch.isfinite(x).all(), name
    plain = dict(guidance="none", prior_guidance="none", steps=4, prior_steps=4, upsampler_steps=3)
    cond, g = {"caption": CAPTIONS}, lambda: torch.Generator().manual_seed(0)  # noqa: E731
    base = api.load_model(run, **plain).sample(2, cond, generator=g())
    for swap in (dict(guidance="cfg", scale=5.0), dict(prior_guidance="cfg", prior_scale=5.0)):
        guided = api.load_model(run, **{**plain, **swap}).sample(2, cond, generator=g())
        assert torch.isfinite(guided).all() and (guided - base).abs().max() > 1e-3, swap
    # CFG at scale 1 is the conditional model, stage by stage (the cascade amplifies a 5e-7 difference in z_i, the
    # rounding of a batch twice as large, about 1600 times by the last image: stages are compared, not images)
    off = api.load_model(run, **plain).components
    on = api.load_model(run, **{**plain, "guidance": "cfg", "scale": 1.0, "prior_guidance": "cfg", "prior_scale": 1.0})
    on = on.components
    with torch.no_grad():
        text = off["encoder"].encode(cond)
        z = [
            c["prior"].sample(2, text, generator=g(), sampler=c["prior_sampler"], guidance=c.get("prior_guidance"))
            for c in (off, on)
        ]
        assert (z[0] - z[1]).abs().max() < 1e-5
        x = [
            c["decoder"].decode(
                torch.randn(2, 3, 8, 8, generator=g()),
                {"emb": z[0], **text},
                generator=g(),
                sampler=c["sampler"],
                guidance=c.get("guidance"),
            )
            for c in (off, on)
        ]
        assert (x[0] - x[1]).abs().max() < 1e-4


def test_unclip_with_an_image_encoder_gives_variations_and_interpolations(tmp_path) -> None:
    """A folder that also holds image_encoder/ and feature_extractor/ (UnCLIPImageVariationPipeline's) gives the
    run's CLIP an image tower: its embeddings are CLIPVisionModelWithProjection's, and variations run."""
    import transformers

    pipe = diffusers.UnCLIPPipeline(**unclip_parts(seed=2))
    pipe.save_pretrained(str(tmp_path / "pipe"))
    torch.manual_seed(3)
    vision = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**test_diffusers.CLIP_TOWER, image_size=16, patch_size=4)
    ).eval()
    vision.save_pretrained(str(tmp_path / "pipe" / "image_encoder"))
    processor = transformers.CLIPImageProcessor(
        crop_size=16, size=16, image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.3, 0.25]
    )
    processor.save_pretrained(str(tmp_path / "pipe" / "feature_extractor"))
    run = api.import_model(tmp_path / "pipe", tmp_path / "run")
    assert load_checkpoint(run).meta["imported_from"]["image_encoder"] is True
    model = api.load_model(run, steps=3, prior_steps=3, upsampler_steps=2)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        pixels = ((x + 1) / 2 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.25]).view(
            1, 3, 1, 1
        )
        want = vision(pixel_values=pixels).image_embeds
        assert (model.image_embeddings(x) - want).abs().max() < 1e-5
    v = model.variations(x, 2, generator=torch.Generator().manual_seed(0))
    path = model.interpolate(x[0], x[1], 3, generator=torch.Generator().manual_seed(0))
    assert v.shape == (4, 3, 16, 16) and path.shape == (3, 3, 16, 16)
    assert torch.isfinite(v).all() and torch.isfinite(path).all()


def test_unclip_folder_with_pickled_weights_is_refused_and_nothing_is_unpickled(tmp_path, monkeypatch) -> None:
    from genzoo.errors import CheckpointError

    diffusers.UnCLIPPipeline(**unclip_parts()).save_pretrained(str(tmp_path / "bin"), safe_serialization=False)
    assert list((tmp_path / "bin" / "prior").glob("*.bin"))  # transformers 5 writes the text encoder as safetensors

    def no_unpickling(*args, **kwargs):
        raise AssertionError("genzoo import unpickled a file")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(CheckpointError, match=r"only pickled weights .*safe_serialization=True"):
        api.import_model(tmp_path / "bin", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_pipeline_genzoo_does_not_import_is_refused_naming_what_it_reads(tmp_path) -> None:
    import json

    from genzoo.errors import GenzooError

    (tmp_path / "sd").mkdir()
    (tmp_path / "sd" / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(
        GenzooError,
        match="holds a StableDiffusionPipeline; `genzoo import` reads DDPMPipeline, "
        "DDIMPipeline, LDMPipeline, UnCLIPPipeline",
    ):
        api.import_model(tmp_path / "sd", tmp_path / "run")
