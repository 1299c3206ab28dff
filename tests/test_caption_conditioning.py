"""Issue 22: the caption reaches GLIDE's denoiser at every resolution, by both of its paths.

GLIDE (Nichol et al. 2022, Sec. 2.3) conditions the U-Net on a caption twice: the text transformer's final token,
projected and added to the timestep embedding (every residual block, so every resolution), and all its tokens
as extra keys and values of every attention layer. Two captions that differ only in the position word must give
different activations at every resolution through the first path, and at every attention resolution through the
second alone. A U-Net that drops either path (a context that never reaches an attention layer, a pooled embedding
that is not added) fails here.
"""

from __future__ import annotations

import pytest
import torch

from genzoo import api
from genzoo.errors import RegistryError

pytestmark = pytest.mark.usefixtures("one_thread")

CAPTIONS = ["a large red circle in the top left", "a large red circle in the bottom right"]
CLIP_TEXT = ["encoder={type: clip-text, pooled_as_emb: true}", "decoder.denoiser.emb_dim_in=64"]


@pytest.fixture(scope="module")
def glide():
    """glide-shapes' text encoder and 16x16 decoder U-Net, with every weight random (the U-Net's zero-initialised
    output and residual convolutions would otherwise hide any difference)."""
    pipeline = api.create_model("glide-shapes", seed=0)
    with torch.no_grad():
        for p in pipeline.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return pipeline.components["encoder"].eval(), pipeline.components["decoder"].denoiser.eval()


def activations(unet, x, t, cond) -> dict[tuple[str, int], torch.Tensor]:
    """Every level's output, keyed by (part, spatial size)."""
    seen, hooks = {}, []
    for part in ("down", "middle", "up"):
        for i, level in enumerate(getattr(unet, part)):
            hooks.append(level.register_forward_hook(lambda m, a, out, key=(part, i): seen.__setitem__(key, out)))
    try:
        with torch.no_grad():
            unet(x, t, cond)
    finally:
        for h in hooks:
            h.remove()
    return {(part, out.shape[-1], i): out for (part, i), out in seen.items()}


def relative_change(a: dict, b: dict) -> dict[tuple[str, int], float]:
    """The largest relative change at each (part, size)."""
    out: dict[tuple[str, int], float] = {}
    for key in a:
        part, size, _ = key
        change = ((a[key] - b[key]).norm() / a[key].norm().clamp_min(1e-12)).item()
        out[(part, size)] = max(out.get((part, size), 0.0), change)
    return out


def test_two_captions_differing_in_position_change_every_resolution(glide) -> None:
    encoder, unet = glide
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    cond = encoder.encode({"caption": CAPTIONS})
    one = {k: v[:1] for k, v in cond.items() if k != "tokens"}
    other = {k: v[1:] for k, v in cond.items() if k != "tokens"}
    assert not torch.equal(one["emb"], other["emb"]) and not torch.equal(one["context"], other["context"])
    change = relative_change(activations(unet, x[:1], t[:1], one), activations(unet, x[:1], t[:1], other))
    sizes = {size for _, size in change}
    assert sizes == {16, 8, 4}, sizes  # the recipe's U-Net: channel_mult [1, 2, 2] at 16x16
    assert all(c > 1e-5 for c in change.values()), change  # float32 rounding: ~1e-7; the same input: 0


def test_the_tokens_alone_reach_every_attention_resolution(glide) -> None:
    """The same pooled embedding for both, only the per-token context differs: every attention layer (and what
    follows it) changes, so the tokens are not lost on the way to any resolution the recipe attends at."""
    encoder, unet = glide
    x, t = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    cond = encoder.encode({"caption": CAPTIONS})
    one = {"emb": cond["emb"][:1], "context": cond["context"][:1], "context_mask": cond["context_mask"][:1]}
    other = {**one, "context": cond["context"][1:], "context_mask": cond["context_mask"][1:]}
    change = relative_change(activations(unet, x, t, one), activations(unet, x, t, other))
    attended = {size for size in (16, 8, 4) if size in unet.cfg.attention_resolutions}
    assert attended, unet.cfg.attention_resolutions
    for (part, size), c in change.items():
        if part == "up" and size in attended:
            assert c > 1e-5, (part, size, change)
    # and the same context gives the same activations: the difference is the caption's, not noise
    same = relative_change(activations(unet, x, t, one), activations(unet, x, t, dict(one)))
    assert max(same.values()) == 0.0


def test_a_dropped_caption_gives_the_same_output_whatever_the_caption(glide) -> None:
    """Classifier-free guidance's unconditional pass: with ``drop`` set, neither path may leak the caption."""
    encoder, unet = glide
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([500, 500])
    cond = {k: v for k, v in encoder.encode({"caption": CAPTIONS}).items() if k != "tokens"}
    with torch.no_grad():
        out = unet(x[:1].expand(2, -1, -1, -1), t, {**cond, "drop": torch.tensor([True, True])})
    torch.testing.assert_close(out[0], out[1], rtol=0, atol=1e-6)


def test_the_tokens_enter_at_the_recipe_attention_resolutions(glide) -> None:
    """The decoder runs at its own image_size (16), not the dataset's (32): the U-Net must be built for it, or
    its attention_resolutions land one level too deep (glide-shapes attended only at 4x4 before this was fixed)."""
    encoder, unet = glide
    cond = {k: v for k, v in encoder.encode({"caption": CAPTIONS[:1]}).items() if k != "tokens"}
    sizes, hooks = set(), []
    for m in unet.modules():
        if getattr(m, "context_kv", None) is not None:  # an attention layer that takes the caption's tokens
            hooks.append(m.register_forward_hook(lambda m, args, out: sizes.add(args[0].shape[-1])))
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 3, 16, 16), torch.tensor([10]), cond)
    finally:
        for h in hooks:
            h.remove()
    assert sizes == set(unet.cfg.attention_resolutions) == {8, 4}


def test_a_caption_encoder_that_reads_the_clip_trains_after_it() -> None:
    """GLIDE with `clip-text` (the recipe's CLIP text tower as a frozen pretrained text encoder, Imagen's choice):
    the CLIP stage comes first, so the decoder learns to read a trained tower; with GLIDE's own text transformer alone
    the noised CLIP (for CLIP guidance) stays after the decoder and upsampler. The frozen tower is no decoder
    parameter."""
    own_only = [
        "encoder={type: text-transformer, context: 32, width: 128, layers: 3, heads: 4}",
        "decoder.denoiser.emb_dim_in=128",
    ]
    own = api.create_model(api.resolve_recipe("glide-shapes", sets=own_only), seed=0)
    assert own.stages == ("decoder", "upsampler", "clip")
    frozen = api.create_model(api.resolve_recipe("glide-shapes", sets=CLIP_TEXT), seed=0)
    assert frozen.stages == ("clip", "decoder", "upsampler")
    in_decoder_stage = {id(p) for p in frozen.optimizer_groups("decoder")["main"]}
    assert not in_decoder_stage & {id(p) for p in frozen.components["clip"].parameters()}


def test_a_frozen_clip_text_tower_feeds_both_paths_of_a_glide_unet() -> None:
    """`clip-text` with ``pooled_as_emb`` gives z_t as the pooled ``emb`` too, so the caption reaches the U-Net with
    its tokens dropped; without it a U-Net that expects a pooled embedding is refused, naming the fix (it would
    otherwise see only its learned null)."""
    model = api.create_model(api.resolve_recipe("glide-shapes", sets=CLIP_TEXT), seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    cond = model.components["encoder"].encode({"caption": CAPTIONS})
    assert torch.equal(cond["emb"], cond["text_emb"]) and cond["context"].shape[-1] == 128
    unet = model.components["decoder"].denoiser.eval()
    with torch.no_grad():  # z_t is unit-norm: make its projection as large as the time embedding's
        unet.emb_proj.weight.mul_(30)
        x, t = torch.randn(1, 3, 16, 16).expand(2, -1, -1, -1), torch.full((2,), 500)
        out = unet(x, t, {**cond, "drop_context": torch.ones(2, dtype=torch.bool)})
        same = unet(x, t, {k: v[:1].expand(2, *v.shape[1:]) for k, v in cond.items()})
    assert (out[0] - out[1]).norm() > 1e-3 * out[0].norm()
    assert torch.equal(same[0], same[1])
    with pytest.raises(RegistryError, match=r"emb_dim_in is 64 .* set encoder.pooled_as_emb: true"):
        api.create_model(api.resolve_recipe("glide-shapes", sets=["encoder={type: clip-text}", CLIP_TEXT[1]]), seed=0)


def test_a_text_pair_reads_both_encoders_side_by_side() -> None:
    """`text-pair` (eDiff-I's two text encoders at once; glide-shapes' encoder): the context is the trained encoder's
    tokens then the frozen CLIP tower's, each part's own output unchanged; ``emb`` both pooled embeddings; only the
    first part trains with the decoder, and the CLIP it reads trains first. Unequal token widths are refused, naming
    the fix."""
    first = "first: {type: text-transformer, context: 32, width: 128, layers: 6, heads: 4}"
    sets = [f"encoder={{type: text-pair, {first}}}", "decoder.denoiser.emb_dim_in=192"]
    model = api.create_model(api.resolve_recipe("glide-shapes", sets=sets), seed=0)
    assert api.resolve_recipe("glide-shapes", sets=sets) == api.resolve_recipe("glide-shapes")  # the recipe's own
    pair = model.components["encoder"]
    cond = pair.encode({"caption": CAPTIONS})
    own, clip = pair.first.encode({"caption": CAPTIONS}), pair.second.encode({"caption": CAPTIONS})
    assert torch.equal(cond["context"], torch.cat([own["context"], clip["context"]], 1))
    assert torch.equal(cond["context_mask"], torch.cat([own["context_mask"], clip["context_mask"]], 1))
    assert torch.equal(cond["emb"], torch.cat([own["emb"], clip["text_emb"]], -1))
    assert model.stages == ("clip", "decoder", "upsampler")
    trained = {id(p) for p in model.optimizer_groups("decoder")["main"]}
    assert {id(p) for p in pair.first.parameters()} <= trained
    assert not trained & {id(p) for p in model.components["clip"].parameters()}
    narrow = [f"encoder={{type: text-pair, {first.replace('width: 128', 'width: 64')}}}", sets[1]]
    with pytest.raises(RegistryError, match=r"first encoder's tokens are 64 wide and the second's 128"):
        api.create_model(api.resolve_recipe("glide-shapes", sets=narrow), seed=0)
