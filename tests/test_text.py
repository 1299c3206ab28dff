"""Text conditioning: the text transformer, CLIP (genzoo's, open_clip's, a timm tower), GLIDE's caption
conditioning, cascade, CFG and CLIP guidance, and caption-attribute evaluation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import assert_refused, shapes_judge, tiny_unet, train

from genzoo import api
from genzoo.data.shapes import parse_caption, render
from genzoo.data.tokenizer import BPETokenizer, BPETokenizerConfig
from genzoo.errors import GenzooError, RegistryError
from genzoo.plugins import default_registry
from genzoo.text.clip import contrastive_loss
from genzoo.text.transformer import TextTransformer, TextTransformerConfig

CAPTIONS = [
    "a large red circle in the top left",
    "bottom right: a small blue cross",
    "a green square, big, at the centre",
]


def test_text_transformer_pools_at_the_end_token_and_never_sees_the_padding() -> None:
    torch.manual_seed(0)
    net = TextTransformer(TextTransformerConfig(context=24, width=32, layers=2, heads=4)).eval()
    tokens = net.tokenize(CAPTIONS)
    assert torch.equal(tokens, BPETokenizer(BPETokenizerConfig(context_length=24)).encode(CAPTIONS))
    pooled, seq, mask = net(tokens)
    lengths = (tokens != 0).sum(1)
    assert torch.equal(mask.sum(1), lengths) and pooled.shape == (3, 32) and seq.shape == (3, 24, 32)
    junk = tokens.clone()
    junk[~mask] = torch.randint(1, 1000, (int((~mask).sum()),))  # anything after EOT: causal attention hides it
    pooled2, seq2, _ = net(junk)
    assert torch.allclose(pooled, pooled2, atol=1e-6) and torch.allclose(seq[mask], seq2[mask], atol=1e-6)
    assert not torch.allclose(pooled[0], pooled[1])


def test_contrastive_loss_matches_its_closed_forms() -> None:
    b = 8
    same = torch.nn.functional.normalize(torch.ones(b, 4), dim=-1)
    loss, _ = contrastive_loss(same, same, torch.tensor(math.log(10.0)))
    assert loss.item() == pytest.approx(math.log(b), abs=1e-5)  # constant logits: uniform over the batch
    eye = torch.eye(b)
    loss, acc = contrastive_loss(eye, eye, torch.tensor(math.log(100.0)))
    # logits 100 on the diagonal, 0 elsewhere: -log(e^100 / (e^100 + b - 1))
    assert loss.item() == pytest.approx(math.log1p((b - 1) * math.exp(-100)), abs=1e-6) and acc.item() == 1.0
    x, y = torch.nn.functional.normalize(torch.randn(2, b, 4), dim=-1)
    assert contrastive_loss(x, y, torch.tensor(1.0))[0].item() == pytest.approx(
        contrastive_loss(y, x, torch.tensor(1.0))[0].item()
    )


TINY_CLIP = [
    "data.image_size=16",
    "data.num_train=3000",
    "clip.embed_dim=32",
    "clip.text_tower.width=32",
    "clip.text_tower.layers=1",
    "clip.image_tower.model_channels=16",
    "train.batch_size=64",
    "train.steps=150",
    "train.lr=3e-3",
    "train.warmup_steps=10",
]


def test_small_clip_learns_attributes_it_can_name_zero_shot(tmp_path: Path) -> None:
    model, source, _ = train(tmp_path, "clip-shapes", TINY_CLIP)
    test = source.split("test").tensors()
    acc = model.zero_shot(test["image"][:500], test["attributes"][:500])
    # chance: colour 1/6, size 1/2; 150 steps learn colour well and size somewhat
    assert acc["zero_shot_colour"] > 0.6, acc
    assert acc["zero_shot_colour"] > 3 * (1 / 6) and set(acc) >= {
        "zero_shot_shape",
        "zero_shot_position",
        "zero_shot_all",
    }
    with pytest.raises(GenzooError, match="draws no images"):
        model.sample(2)
    reloaded = api.load_model(tmp_path)
    assert reloaded.zero_shot(test["image"][:100], test["attributes"][:100]) == model.zero_shot(
        test["image"][:100], test["attributes"][:100]
    )


def test_clip_with_a_timm_image_tower_builds_and_encodes() -> None:
    reg = default_registry()
    spec = api.resolve_recipe("clip-shapes-timm", sets=TINY_CLIP[:4])
    clip = api.create_model(spec, data_spec=api.build_data(spec).spec).components["clip"]
    img = clip.encode_image(torch.rand(2, 3, 16, 16) * 2 - 1)
    assert img.shape == (2, 32) and torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    with pytest.raises(RegistryError, match="takes no t"):
        reg.build(
            "clip",
            {"type": "clip", "noised": True, "image_tower": {"type": "timm", "model": "resnet10t"}},
            data=api.build_data(spec).spec,
        )
    with pytest.raises(RegistryError, match="not a timm model"):
        reg.build("network", {"type": "timm", "model": "no-such-net"}, data=api.build_data(spec).spec)


def test_open_clip_by_name_offline_and_from_a_local_safetensors_file(tmp_path: Path, monkeypatch) -> None:
    from safetensors.torch import save_file

    reg = default_registry()
    torch.manual_seed(0)
    clip = reg.build(
        "clip", {"type": "open-clip", "model": "ViT-S-32"}
    )  # architecture only: random weights, no network
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    img, txt = clip.encode_image(x), clip.encode_text(CAPTIONS[:2])
    assert img.shape == txt.shape and torch.allclose(img.norm(dim=-1), torch.ones(2), atol=1e-5)
    # genzoo's BPE tokens (any context length) are open_clip's: the token path equals the caption path
    tokens = BPETokenizer(BPETokenizerConfig(context_length=32)).encode(CAPTIONS[:2])
    assert torch.allclose(clip.encode_tokens(tokens), txt, atol=1e-5)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in clip.model.state_dict().items()}, str(path))
    again = reg.build("clip", {"type": "open-clip", "model": "ViT-S-32", "checkpoint": str(path)})
    assert torch.allclose(again.encode_image(x), img, atol=1e-5)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(GenzooError, match="no network"):
        reg.build("clip", {"type": "open-clip", "model": "ViT-B-32", "pretrained": "laion2b_s34b_b79k"})
    with pytest.raises(RegistryError, match="not an open_clip architecture"):
        reg.build("clip", {"type": "open-clip", "model": "ViT-Q-99"})
    with pytest.raises(RegistryError, match="never unpickles"):
        reg.build("clip", {"type": "open-clip", "model": "ViT-S-32", "checkpoint": str(tmp_path / "w.bin")})


def test_a_dropped_caption_is_the_unconditional_input() -> None:
    net = tiny_unet(std=0.05, context_dim=32, emb_dim_in=32)  # every path matters
    text = TextTransformer(TextTransformerConfig(width=32, layers=1))
    pooled, seq, mask = text(text.tokenize(CAPTIONS[:2]))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    cond = {"emb": pooled, "context": seq, "context_mask": mask}
    dropped = net(x, t, {**cond, "drop": torch.tensor([True, True])})
    assert torch.allclose(dropped, net(x, t, None), atol=1e-5)
    assert not torch.allclose(net(x, t, cond), dropped, atol=1e-3)


TINY_GLIDE = [
    "data.image_size=16",
    "data.num_train=2000",
    "decoder.image_size=8",
    "encoder.first.width=32",
    "encoder.first.layers=2",
    "decoder.denoiser.model_channels=16",
    "decoder.denoiser.num_res_blocks=1",
    "decoder.denoiser.context_dim=32",
    "decoder.denoiser.emb_dim_in=96",  # the text transformer's 32 and the CLIP's 64
    "decoder.denoiser.attention_resolutions=[4]",
    "decoder.denoiser.dropout=0.0",
    "upsampler_decoder.denoiser.model_channels=16",
    "clip.text_tower.width=32",
    "clip.text_tower.layers=1",
    "clip.image_tower.image_size=8",
    "clip.image_tower.model_channels=16",
    "train.batch_size=32",
    "train.stages={clip: 60, decoder: 300, upsampler: 100}",
    "train.lr=2e-3",
    "train.ema_decay=null",
    "train.warmup_steps=20",
    "sampler.steps=10",
    "upsampler_sampler.steps=5",
]


@pytest.fixture(scope="module")
def glide_run(tmp_path_factory) -> tuple[Path, object, object]:
    run = tmp_path_factory.mktemp("glide")
    model, source, _ = train(run, "glide-shapes", TINY_GLIDE)
    return run, model, source


def test_glide_uses_the_caption_the_cascade_and_every_guidance(glide_run) -> None:
    run, model, source = glide_run
    assert model.stages == ("clip", "decoder", "upsampler")
    test = source.split("test").tensors()
    x0 = model.low_res(test["image"][:256])
    dec = model.components["decoder"]
    torch.manual_seed(0)
    t = torch.randint(0, 1000, (len(x0),))
    noise = torch.randn_like(x0)

    def loss(captions: list[str]) -> float:
        cond = model.components["encoder"].encode({"caption": captions})
        return dec.diffusion.training_losses(dec.denoiser, x0, t, cond=cond, noise=noise)["mse"].mean().item()

    right, shuffled = loss(test["caption"][:256]), loss(test["caption"][1:257])
    assert right < 0.97 * shuffled, (right, shuffled)  # the denoiser reads the caption: the wrong one costs
    g = torch.Generator().manual_seed(0)
    for guidance in ("cfg", "clip", "none"):
        m = api.load_model(run, guidance=guidance, **({} if guidance == "none" else {"scale": 3.0}))
        out = m.sample(3, {"caption": CAPTIONS}, generator=g)
        assert out.shape == (3, 3, 16, 16) and torch.isfinite(out).all()
    unconditional = model.sample(2, None, generator=g)  # the null caption
    assert unconditional.shape == (2, 3, 16, 16)
    with pytest.raises(GenzooError, match="--prompt"):
        model.sample(2, {"y": torch.zeros(2, dtype=torch.long)})


def test_glide_upsampler_reads_its_low_resolution_input(glide_run) -> None:
    _, model, source = glide_run
    real = source.split("test").tensors()["image"][:256]
    low = model.low_res(real)
    assert (
        low.shape[-1] == 8
        and model.upsample(low[:4], generator=torch.Generator().manual_seed(0)).shape == real[:4].shape
    )
    up = model.upsampler
    torch.manual_seed(0)
    t, noise = torch.randint(0, 1000, (len(real),)), torch.randn_like(real)

    def loss(low_res: torch.Tensor) -> float:
        return (
            up.diffusion.training_losses(up.denoiser, real, t, cond={"low_res": low_res}, noise=noise)["mse"]
            .mean()
            .item()
        )

    assert loss(low) < 0.8 * loss(low.roll(1, 0))  # the right low-resolution image explains much of x_0


def test_clip_guidance_gradient_raises_the_clip_logit_and_needs_a_clip(glide_run) -> None:
    _, model, _ = glide_run
    m = api.load_model(glide_run[0], guidance="clip", scale=1.0)
    guidance, clip = m.components["guidance"], m.components["clip"]
    assert guidance.clip is clip and not any(True for _ in guidance.parameters())  # borrowed, saved once
    tokens = m.components["encoder"].tokenize(CAPTIONS)
    x, t = torch.randn(3, 3, 8, 8), torch.full((3,), 100)
    grad = guidance.grad_log_p(x, t, {"tokens": tokens})

    def logit(z: torch.Tensor) -> torch.Tensor:
        return (clip.encode_image(z, t) * clip.encode_tokens(tokens)).sum(-1)

    with torch.no_grad():
        step = 1e-2 / grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        assert (logit(x + step * grad) > logit(x)).all()
    own_encoder = ["encoder={type: text-transformer, width: 32, layers: 2}", "decoder.denoiser.emb_dim_in=32"]
    no_clip = ["components.clip=null", "guidance.type=clip"]
    assert_refused("glide-shapes", [*TINY_GLIDE, *own_encoder, *no_clip], "has no CLIP")
    assert_refused("glide-shapes", [*TINY_GLIDE, *no_clip], "second: encoder 'clip-text' .* add components.clip")


def test_glide_from_the_command_line(glide_run, tmp_path: Path) -> None:
    from genzoo.cli import main

    out = tmp_path / "grid.png"
    prompted = ["sample", str(glide_run[0]), "-n", "2", "--prompt", "a large red circle in the top left"]
    assert main([*prompted, "--guidance", "cfg", "--scale", "3", "--steps", "5", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", str(glide_run[0]), "-n", "2", "--class", "3", "--out", str(out)]) == 2


@pytest.mark.parametrize(
    ("sets", "match"),
    [
        (["encoder.first.width=48", "clip.text_tower.width=48"], "context_dim is 32 but the text encoder needs 48"),
        (["encoder.first.width=48"], "tokens are 48 wide and the second's 32"),
        (["components.encoder=null"], "needs a text encoder"),
    ],
)
def test_a_caption_model_needs_a_text_encoder_of_the_denoisers_width(sets: list[str], match: str) -> None:
    assert_refused("glide-shapes", [*TINY_GLIDE, *sets], match)


class CaptionOracle(torch.nn.Module):
    """Draws exactly what each caption asks (or, ``liar``, the next caption's picture)."""

    def __init__(self, *, liar: bool = False) -> None:
        from genzoo.pipelines import Conditioning

        super().__init__()
        self.condition, self.liar, self.components = Conditioning.caption, liar, {}

    def sample(self, n, condition=None, *, generator=None):
        attrs = torch.tensor([list(parse_caption(c).values()) for c in condition["caption"]])
        return render(attrs.roll(1, 0) if self.liar else attrs, 32, torch.Generator().manual_seed(0))


def test_caption_attribute_accuracy_tells_an_oracle_from_a_liar(cheap_judges) -> None:
    judged = shapes_judge({"attribute-accuracy": default_registry().build("metric", "attribute-accuracy")})
    good, bad = judged(CaptionOracle()), judged(CaptionOracle(liar=True))
    assert good["caption_accuracy"] > 0.8 and bad["caption_accuracy"] < 0.2, (good, bad)
    assert all(good[f"{a}_accuracy"] > 0.9 for a in ("shape", "colour", "size", "position")), good
    held = judged(CaptionOracle(), samples=200, split="heldout")
    assert held["caption_accuracy"] > 0.5  # unseen colour x shape pairs: the cheap judge generalises less


def test_compare_asks_a_caption_model_for_each_prompt_and_judges_the_heldout_split(
    glide_run, tmp_path: Path, cheap_judges
) -> None:
    """`genzoo compare RUN --split heldout --prompt A --prompt B` (make demo-text): the held-out captions are asked
    for, all four attributes and each one are columns, and a grid holds one row of 8 samples per prompt, in order,
    drawn from the comparison's seed."""
    import json

    import numpy as np
    from PIL import Image

    from genzoo.cli import main
    from genzoo.training.images import grid_image

    run, _, _ = glide_run
    prompts = ["a large red circle in the top left", "a small blue square in the bottom right"]
    out = tmp_path / "cmp"
    argv = ["compare", str(run), "--out", str(out), "--samples", "32", "--split", "heldout", "--seed", "3"]
    assert main([*argv, "--metrics", "attribute-accuracy", *[a for p in prompts for a in ("--prompt", p)]]) == 0
    board = json.loads((out / "leaderboard.json").read_text())
    (row,) = board["rows"]
    assert board["settings"]["split"] == "heldout" and not row["error"]
    assert {"shape_accuracy", "colour_accuracy", "size_accuracy", "position_accuracy", "caption_accuracy"} <= set(row)
    header = (out / "leaderboard.md").read_text()
    assert "position_accuracy" in header and all(f'"{p}"' in header for p in prompts)
    model = api.load_model(run)
    g = torch.Generator().manual_seed(3)
    expected = torch.cat([model.sample(8, {"caption": [p] * 8}, generator=g) for p in prompts])
    png = torch.tensor(np.array(Image.open(out / row["prompt_grid"]).convert("RGB")))
    assert torch.equal(png, grid_image(expected, 8))
