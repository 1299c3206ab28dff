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

from genzoo import api  # noqa: E402
from genzoo.checkpoint import load_checkpoint  # noqa: E402
from genzoo.interfaces import missing_latent_interface  # noqa: E402
from genzoo.plugins import default_registry  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def nhwc(x: torch.Tensor) -> np.ndarray:
    """genzoo's [-1, 1] samples as diffusers' pipelines return them with output_type='np'."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def ddpm_unet(seed: int = 0, **kw) -> torch.nn.Module:
    """DDPM's layout (genzoo's U-Net natively) at 8x8, 16/32 channels."""
    torch.manual_seed(seed)
    cfg = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        norm_eps=1e-6,
    )
    return diffusers.UNet2DModel(**{**cfg, **kw}).eval()


# --------------------------------------------------------------------------- LDMPipeline


def vqmodel(seed: int = 1, **kw) -> torch.nn.Module:
    """A VQModel with f = 2 (two levels), 3-channel latents, 16 codes, and a scaling factor that is not 1."""
    torch.manual_seed(seed)
    cfg = dict(
        block_out_channels=[8, 16],
        norm_num_groups=8,
        in_channels=3,
        out_channels=3,
        latent_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2,
        up_block_types=["UpDecoderBlock2D"] * 2,
        num_vq_embeddings=16,
        scaling_factor=0.7,
    )
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
    assert ckpt.recipe["components"]["sampler"]["type"] == "ddim" and ckpt.recipe["components"]["sampler"]["steps"] == 50
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
            vocab_size=len(tok), hidden_size=16, projection_dim=16, intermediate_size=37, num_attention_heads=4,
            num_hidden_layers=2, max_position_embeddings=10, bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
    ).eval()
    prior = diffusers.PriorTransformer(
        num_attention_heads=2, attention_head_dim=8, num_layers=1, embedding_dim=16, num_embeddings=10,
        additional_embeddings=4,
    ).eval()
    proj = UnCLIPTextProjModel(
        clip_embeddings_dim=16, time_embed_dim=128, cross_attention_dim=32, clip_extra_context_tokens=4
    ).eval()
    with torch.no_grad():  # make the parameters diffusers initialises to constants matter
        prior.clip_mean.normal_()
        prior.clip_std.uniform_(0.5, 2)
        proj.learned_classifier_free_guidance_embeddings.normal_()
    decoder = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=3, out_channels=6, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", cross_attention_dim=32, attention_head_dim=4,
        resnet_time_scale_shift="scale_shift", class_embed_type="identity",
    ).eval()

    def super_res() -> torch.nn.Module:
        return diffusers.UNet2DModel(
            sample_size=16, in_channels=6, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
            down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
            up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
        ).eval()

    sched = diffusers.UnCLIPScheduler
    return dict(
        prior=prior, decoder=decoder, text_encoder=text, tokenizer=tok, text_proj=proj,
        super_res_first=super_res(), super_res_last=super_res(),
        prior_scheduler=sched(num_train_timesteps=100, variance_type="fixed_small_log", prediction_type="sample",
                              clip_sample_range=5.0),
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


@pytest.mark.parametrize("scales", [(4.0, 8.0), (1.0, 1.0), (2.0, 3.0)])
def test_unclip_run_equals_unclip_pipeline(unclip, scales) -> None:
    """End to end from the same generator: prior (CFG), decoder (CFG, learned range), super-resolution whose last
    step is super_res_last. Scales (1, 1) are diffusers without CFG: genzoo then runs with both guidances swapped out."""
    _, run, pipe = unclip
    prior_scale, scale = scales
    want = pipe(
        prompt=CAPTIONS, generator=torch.Generator().manual_seed(0), output_type="np",
        prior_guidance_scale=prior_scale, decoder_guidance_scale=scale,
    ).images
    if scales == (1.0, 1.0):
        model = api.load_model(run, guidance="none", prior_guidance="none")
    else:
        model = api.load_model(run, scale=scale, prior_scale=prior_scale)
    got = nhwc(model.sample(2, {"caption": CAPTIONS}, generator=torch.Generator().manual_seed(0)))
    assert got.shape == want.shape == (2, 16, 16, 3)
    assert np.abs(got - want).max() < 1e-4


def test_the_float32_last_step_quirk_is_the_only_difference(unclip) -> None:
    """With diffusers' own super-resolution scheduler (the quirk kept there), its images are genzoo's with the last
    step's x0_hat scaled by beta_0 / (1 - abar_0) in float32."""
    _, run, pipe = unclip
    kept = pipe.super_res_scheduler
    pipe.super_res_scheduler = diffusers.UnCLIPScheduler.from_config(kept.config)
    try:
        want = pipe(prompt=CAPTIONS, generator=torch.Generator().manual_seed(0), output_type="np").images
    finally:
        pipe.super_res_scheduler = kept
    s = diffusers.UnCLIPScheduler.from_config(kept.config)
    factor = float(s.betas[0] / (1 - s.alphas_cumprod[0]))
    assert 1e-6 < abs(factor - 1) < 1e-4
    x = api.load_model(run).sample(2, {"caption": CAPTIONS}, generator=torch.Generator().manual_seed(0))
    assert np.abs(nhwc(x * factor) - want).max() < 1e-5
