"""Networks: shapes, zero init, the cond-dict convention, channels_last, time embedding."""

from __future__ import annotations

import math

import torch

from genzoo.nn import MLPDenoiser, MLPDenoiserConfig, NoisyClassifier, NoisyClassifierConfig, UNet, UNetConfig
from genzoo.nn.embeddings import timestep_embedding

SMALL = dict(in_channels=3, image_size=8, model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_resolutions=[4])


def randomise(m: torch.nn.Module) -> torch.nn.Module:
    """Perturb every weight, so zero-initialised layers no longer hide the conditioning paths."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_timestep_embedding_formula() -> None:
    e = timestep_embedding(torch.tensor([3.0]), 8)
    w = [10_000 ** (-i / 4) for i in range(4)]
    want = [math.cos(3 * x) for x in w] + [math.sin(3 * x) for x in w]
    torch.testing.assert_close(e[0], torch.tensor(want))


def test_unet_shapes_and_zero_init() -> None:
    u = UNet(UNetConfig(**SMALL, learn_sigma=True))
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 500])
    out = u(x, t)
    assert out.shape == (2, 6, 8, 8) and out.abs().max() == 0  # zero-initialised output (ADM)


def test_dropped_condition_equals_missing_condition_and_class_changes_output() -> None:
    u = randomise(UNet(UNetConfig(**SMALL, num_classes=5))).eval()
    x, t = torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3])
    y = torch.tensor([0, 1, 2])
    dropped = u(x, t, {"y": y, "drop": torch.ones(3, dtype=torch.bool)})
    torch.testing.assert_close(dropped, u(x, t, None))
    assert not torch.allclose(u(x, t, {"y": y}), u(x, t, {"y": (y + 1) % 5}))


def test_context_tokens_and_pooled_embedding_are_used() -> None:
    u = randomise(UNet(UNetConfig(**SMALL, context_dim=12, emb_dim_in=6))).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10, 20])
    base = {"context": torch.randn(2, 5, 12), "context_mask": torch.ones(2, 5, dtype=torch.bool), "emb": torch.randn(2, 6)}
    out = u(x, t, base)
    assert not torch.allclose(out, u(x, t, {**base, "context": torch.randn(2, 5, 12)}))
    assert not torch.allclose(out, u(x, t, {**base, "emb": torch.randn(2, 6)}))
    # masked tokens are ignored
    masked = {**base, "context_mask": torch.tensor([[True, True, False, False, False]] * 2)}
    other = {**masked, "context": torch.cat([base["context"][:, :2], torch.randn(2, 3, 12)], 1)}
    torch.testing.assert_close(u(x, t, masked), u(x, t, other))


def test_channels_last_matches_contiguous() -> None:
    u = randomise(UNet(UNetConfig(**SMALL))).eval()
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([5, 6])
    ref = u(x, t)
    u = u.to(memory_format=torch.channels_last)
    torch.testing.assert_close(u(x.contiguous(memory_format=torch.channels_last), t), ref, rtol=1e-5, atol=1e-5)


def test_upsampler_input_and_mlp_and_classifier() -> None:
    u = UNet(UNetConfig(**{**SMALL, "image_size": 16}, cond_channels=3))
    assert u(torch.randn(2, 3, 16, 16), torch.tensor([1, 2]), {"low_res": torch.randn(2, 3, 8, 8)}).shape == (2, 3, 16, 16)
    m = randomise(MLPDenoiser(MLPDenoiserConfig(dim=6, learn_sigma=True, emb_dim_in=4)))
    out = m(torch.randn(3, 6), torch.tensor([1, 2, 3]), {"emb": torch.randn(3, 4)})
    assert out.shape == (3, 12)
    c = NoisyClassifier(NoisyClassifierConfig(num_classes=7, in_channels=1, image_size=8, channel_mult=[1, 2]))
    assert c(torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])).shape == (4, 7)


def test_plain_resampling_variant() -> None:
    """resblock_updown=False resamples with convs (DDPM), fewer FLOPs than ADM's residual resampling."""
    from torch.utils.flop_counter import FlopCounterMode

    flops = {}
    for updown in (True, False):
        u = UNet(UNetConfig(**SMALL, resblock_updown=updown))
        with FlopCounterMode(display=False) as fc:
            assert u(torch.randn(2, 3, 8, 8), torch.tensor([1, 2])).shape == (2, 3, 8, 8)
        flops[updown] = fc.get_total_flops()
    assert flops[False] < flops[True]
