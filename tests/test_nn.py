"""Networks: shapes, zero init, the cond-dict convention, channels_last, time embedding, GPT and its KV cache."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from pydantic import ValidationError

from genzoo.nn import (
    GPT,
    CachedLogits,
    GPTConfig,
    KVCache,
    MLPDenoiser,
    MLPDenoiserConfig,
    NoisyClassifier,
    NoisyClassifierConfig,
    UNet,
    UNetConfig,
    unet_flops,
)
from genzoo.nn.embeddings import timestep_embedding
from genzoo.nn.unet import flop_counter, num_groups
from genzoo.tokens import TokenSampler, TokenSamplerConfig

SMALL = dict(
    in_channels=3, image_size=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4]
)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def randomise(m: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight, so zero-initialised layers no longer hide the conditioning paths."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def train(net: torch.nn.Module, loss_fn: Callable[[], torch.Tensor], steps: int) -> None:
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    opt.zero_grad()


# ------------------------------------------------------------------ embeddings


def test_timestep_embedding_formula() -> None:
    t = torch.tensor([0.0, 3.0, 999.5])
    e = timestep_embedding(t, 9)  # odd dim: 4 frequencies, cos then sin, then a zero pad
    w = [10_000 ** (-i / 4) for i in range(4)]
    for row, s in zip(e, t.tolist()):
        want = [math.cos(s * x) for x in w] + [math.sin(s * x) for x in w] + [0.0]
        torch.testing.assert_close(row, torch.tensor(want), rtol=0, atol=1e-4)
    assert e.dtype == torch.float32 and timestep_embedding(torch.tensor([7]), 8).dtype == torch.float32


def test_groupnorm_rule() -> None:
    assert [num_groups(c) for c in (3, 8, 16, 48, 64, 80, 128, 192, 256)] == [1, 4, 8, 24, 32, 20, 32, 32, 32]


# ------------------------------------------------------------------ U-Net


def test_unet_shapes_and_zero_init() -> None:
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    out = UNet(UNetConfig(**SMALL, learn_sigma=True))(x, t)
    assert out.shape == (2, 6, 8, 8) and out.abs().max() == 0  # zero-initialised output conv (ADM)
    assert UNet(UNetConfig(**SMALL))(x, t).shape == (2, 3, 8, 8)
    assert UNet(UNetConfig(**SMALL, out_channels=5))(x, t).shape == (2, 5, 8, 8)
    u = UNet(UNetConfig(**SMALL))  # every residual branch starts as zero too, not only the final conv
    assert all(b.res.out_conv.weight.abs().max() == 0 for b in u.down)


def test_unet_config_errors() -> None:
    with pytest.raises(ValidationError, match="not divisible by 2"):
        UNetConfig(**{**SMALL, "image_size": 9})
    with pytest.raises(ValidationError, match="extra"):
        UNetConfig(**SMALL, channels=3)
    with pytest.raises(ValueError, match="do not split into 3 heads"):
        UNet(UNetConfig(**SMALL, num_heads=3))
    with pytest.raises(ValueError, match="needs cond\\['low_res'\\]"):
        UNet(UNetConfig(**SMALL, cond_channels=3))(torch.randn(1, 3, 8, 8), torch.tensor([1]))


def test_num_heads_overrides_head_channels() -> None:
    u = UNet(UNetConfig(**SMALL, num_heads=4))
    assert {b.attn.heads for b in [*u.down, *u.middle, *u.up] if b.attn is not None} == {4}
    u = UNet(UNetConfig(**SMALL, num_head_channels=8))  # 32 channels at 4x4 -> 4 heads, 32 in the middle -> 4
    assert {b.attn.heads for b in [*u.down, *u.middle, *u.up] if b.attn is not None} == {4}


def test_dropped_condition_equals_missing_condition() -> None:
    u = randomise(UNet(UNetConfig(**SMALL, num_classes=5, context_dim=12, emb_dim_in=6))).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    cond = {"y": torch.tensor([0, 1, 2]), "emb": torch.randn(3, 6), "context": torch.randn(3, 4, 12)}
    missing = u(x, t, None)
    torch.testing.assert_close(
        u(x, t, {**cond, "drop": torch.ones(3, dtype=torch.bool)}), missing, rtol=1e-5, atol=1e-6
    )
    # per-sample: only the dropped row equals the unconditional output
    partial = u(x, t, {**cond, "drop": torch.tensor([False, True, False])})
    torch.testing.assert_close(partial[1], missing[1], rtol=1e-5, atol=1e-6)
    assert (partial[0] - missing[0]).abs().max() > 1e-3
    torch.testing.assert_close(partial[0], u(x, t, cond)[0], rtol=1e-5, atol=1e-6)


def test_class_embedding_changes_output_after_a_training_step() -> None:
    u = UNet(UNetConfig(**SMALL, num_classes=5))
    x, t, y = torch.randn(4, 3, 8, 8), torch.tensor([1, 2, 3, 4]), torch.tensor([0, 1, 2, 3])
    torch.testing.assert_close(u(x, t, {"y": y}), u(x, t, {"y": (y + 1) % 5}))  # zero init: no class effect yet
    target = torch.randn(4, 3, 8, 8)
    # step 1 moves only the final conv, step 2 the residual out-convs; only then is the class path live
    train(u, lambda: (u(x, t, {"y": y}) - target).pow(2).mean(), steps=3)
    with torch.no_grad():
        assert (u(x, t, {"y": y}) - u(x, t, {"y": (y + 1) % 5})).abs().max() > 1e-3
    assert u.class_emb.weight.shape[0] == 6  # index num_classes is the learned null


def test_context_tokens_are_attended_to() -> None:
    u = UNet(UNetConfig(**SMALL, context_dim=12, emb_dim_in=6))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    base = {
        "context": torch.randn(2, 5, 12),
        "context_mask": torch.ones(2, 5, dtype=torch.bool),
        "emb": torch.randn(2, 6),
    }
    target = torch.randn(2, 3, 8, 8)
    # the zero-initialised attention output projection blocks the gradient at first
    train(u, lambda: (u(x, t, base) - target).pow(2).mean(), steps=3)
    first = u.down[2].attn if u.down[2].attn is not None else u.middle[0].attn
    loss = (u(x, t, base) - target).pow(2).mean()
    loss.backward()
    assert first.context_kv.weight.grad.abs().max() > 0  # gradient reaches the per-layer context projection
    with torch.no_grad():
        out = u(x, t, base)
        assert (out - u(x, t, {**base, "context": torch.randn(2, 5, 12)})).abs().max() > 1e-3
        assert (out - u(x, t, {**base, "emb": torch.randn(2, 6)})).abs().max() > 1e-3
        # masked tokens are ignored
        masked = {**base, "context_mask": torch.tensor([[True, True, False, False, False]] * 2)}
        other = {**masked, "context": torch.cat([base["context"][:, :2], torch.randn(2, 3, 12)], 1)}
        torch.testing.assert_close(u(x, t, masked), u(x, t, other))


def test_channels_last_matches_contiguous() -> None:
    u = randomise(UNet(UNetConfig(**SMALL, context_dim=4))).eval()
    x, t, c = torch.randn(2, 3, 8, 8), torch.tensor([5, 6]), {"context": torch.randn(2, 3, 4)}
    ref = u(x, t, c)
    u = u.to(memory_format=torch.channels_last)
    out = u(x.contiguous(memory_format=torch.channels_last), t, c)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_upsampler_low_res_input() -> None:
    u = randomise(UNet(UNetConfig(**{**SMALL, "image_size": 16}, cond_channels=3))).eval()
    x, t, low = torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), torch.randn(2, 3, 8, 8)
    out = u(x, t, {"low_res": low})
    assert out.shape == (2, 3, 16, 16)
    # the U-Net does the bilinear upsampling itself: passing the upsampled image at full size is the same
    up = torch.nn.functional.interpolate(low, size=(16, 16), mode="bilinear", align_corners=False)
    torch.testing.assert_close(u(x, t, {"low_res": up}), out)


def test_flops_counted_with_attention_and_plain_resampling_cheaper() -> None:
    """SDPA is counted on CPU (plain FlopCounterMode misses the fused CPU kernel) and on meta."""
    flops = {}
    for updown in (True, False):
        flops[updown] = unet_flops(UNetConfig(**SMALL, resblock_updown=updown), 2)
    assert flops[False] < flops[True]
    u = UNet(UNetConfig(**SMALL))
    with flop_counter() as fc:
        u(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    assert fc.get_total_flops() == flops[True]  # the meta-device count is the real one
    sdpa = {str(k): v for k, v in fc.get_flop_counts()["Global"].items() if "attention" in str(k)}
    # attention at 4x4 (16 tokens, 32 ch) once down, twice up (2 blocks), once in the middle: QK^T and AV
    assert sum(sdpa.values()) == 4 * 2 * (2 * 2 * 16 * 16 * 32)


# ------------------------------------------------------------------ MLP denoiser and classifier


def test_mlp_denoiser_shapes_zero_init_and_drop() -> None:
    m = MLPDenoiser(MLPDenoiserConfig(dim=6, learn_sigma=True, emb_dim_in=4, num_classes=3))
    x, t = torch.randn(3, 6), torch.tensor([1, 2, 3])
    out = m(x, t, {"emb": torch.randn(3, 4)})
    assert out.shape == (3, 12) and out.abs().max() == 0
    assert MLPDenoiser(MLPDenoiserConfig(dim=6))(x, t).shape == (3, 6)
    m = randomise(m)
    cond = {"emb": torch.randn(3, 4), "y": torch.tensor([0, 1, 2])}
    torch.testing.assert_close(m(x, t, {**cond, "drop": torch.ones(3, dtype=torch.bool)}), m(x, t))
    assert (m(x, t, cond) - m(x, t)).abs().max() > 1e-4
    # image-shaped inputs come back image-shaped, with the doubled channels of learned sigma
    img = MLPDenoiser(MLPDenoiserConfig(dim=12, learn_sigma=True))(torch.randn(2, 3, 2, 2), torch.tensor([1, 2]))
    assert img.shape == (2, 6, 2, 2)


def test_noisy_classifier_shape() -> None:
    c = NoisyClassifier(NoisyClassifierConfig(num_classes=7, in_channels=1, image_size=8, channel_mult=[1, 2]))
    assert c(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).shape == (4, 7)


# ------------------------------------------------------------------ GPT

TINY = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_embd=32)


def test_gpt_is_causal() -> None:
    g = GPT(TINY).eval()
    idx = torch.randint(0, 11, (2, 10))
    changed = idx.clone()
    changed[:, 6] = (changed[:, 6] + 1) % 11
    a, _ = g(idx)
    b, _ = g(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-4


def test_gpt_weight_tying_and_block_size_error() -> None:
    g = GPT(TINY)
    assert g.lm_head.weight is g.transformer.wte.weight
    with pytest.raises(ValueError, match="exceeds block_size=16"):
        g(torch.zeros(1, 15, dtype=torch.long), prefix_emb=torch.zeros(1, 2, 32))


def test_kv_cache_logits_equal_full_forward() -> None:
    g = randomise(GPT(TINY)).eval()
    idx, prefix = torch.randint(0, 11, (3, 9)), torch.randn(3, 2, 32)
    full, _ = g(idx, prefix_emb=prefix)  # (3, 10, V): last prefix position, then every token
    cache = KVCache()
    steps = [g(idx[:, :4], prefix_emb=prefix, kv_cache=cache)[0]]  # a chunk first (needs the offset mask later)
    steps.append(g(idx[:, 4:7], kv_cache=cache)[0])  # a multi-token chunk against a cache
    steps += [g(idx[:, i : i + 1], kv_cache=cache)[0] for i in range(7, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 11


def test_cached_logits_feed_one_token_per_step() -> None:
    g = randomise(GPT(TINY)).eval()
    calls: list[int] = []
    g.transformer.wte.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    sampler = TokenSampler(TokenSamplerConfig())
    out = sampler.sample(CachedLogits(g), torch.randint(0, 11, (2, 3)), 6, generator=torch.Generator().manual_seed(0))
    assert out.shape == (2, 6) and calls == [3, 1, 1, 1, 1, 1]


def test_loss_weights_and_ignore_index() -> None:
    g = randomise(GPT(TINY)).eval()
    idx = torch.randint(0, 11, (2, 8))
    logits, loss = g(idx[:, :-1], idx[:, 1:])
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten(), reduction="none").view(2, 7)
    torch.testing.assert_close(loss, ce.mean())
    w = torch.tensor([1 / 8 / 3] * 3 + [7 / 8 / 4] * 4)  # DALL·E: text 1/8, image 7/8
    _, wl = g(idx[:, :-1], idx[:, 1:], loss_weights=w)
    torch.testing.assert_close(wl, ce[:, :3].mean() / 8 + 7 * ce[:, 3:].mean() / 8)
    targets = idx[:, 1:].clone()
    targets[:, :3] = -1
    torch.testing.assert_close(g(idx[:, :-1], targets)[1], ce[:, 3:].mean())


def test_gpt_overfits_with_a_prefix() -> None:
    """Two sequences told apart only by their prefix embedding: memorised in 100 steps."""
    g = GPT(GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_embd=32))
    seqs = torch.randint(0, 11, (2, 10), generator=torch.Generator().manual_seed(1))
    prefix = torch.randn(2, 1, 32)
    opt = torch.optim.AdamW(g.parameters(), lr=3e-3)
    first = None
    for _ in range(100):
        _, loss = g(seqs, seqs, prefix_emb=prefix)  # with a prefix, logits[:, i] predicts idx[:, i]
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 2.0 and loss.item() < 0.05
    g.eval()
    drawn = TokenSampler(TokenSamplerConfig(temperature=0.01)).sample(
        CachedLogits(g, prefix=lambda c: prefix), seqs[:, :0], 10, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(drawn, seqs, rtol=0, atol=0)


def test_cached_logits_drive_the_token_sampler_like_full_passes() -> None:

    g = randomise(GPT(TINY)).eval()
    prefix = torch.randn(2, 1, 32)
    full = lambda tokens, cond: g(tokens, prefix_emb=prefix)[0][:, -1]  # noqa: E731
    sampler = TokenSampler(TokenSamplerConfig(top_k=5))
    prompt = torch.randint(0, 11, (2, 2))
    want = sampler.sample(full, prompt, 8, generator=torch.Generator().manual_seed(3))
    calls: list[int] = []
    g.transformer.wte.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[1]))
    got = sampler.sample(
        CachedLogits(g, prefix=lambda cond: prefix), prompt, 8, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(got, want) and calls == [2] + [1] * 7
