"""Token sampling (temperature, top-k, top-p) and classifier-free guidance on logits."""

from __future__ import annotations

import pytest
import torch

from genzoo.tokens import LogitCFG, LogitCFGConfig, TokenSampler, TokenSamplerConfig, filter_logits

LOGITS = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))


def test_top_k_keeps_k_largest() -> None:
    out = filter_logits(LOGITS, top_k=2)
    assert torch.isfinite(out[0, :2]).all() and torch.isinf(out[0, 2:]).all()


def test_top_p_keeps_smallest_set_reaching_p() -> None:
    assert torch.isfinite(filter_logits(LOGITS, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(LOGITS, top_p=0.7)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(LOGITS, top_p=0.76)).tolist() == [[True, True, True, False]]
    shuffled = LOGITS[:, [2, 0, 3, 1]]  # order must not matter
    assert torch.isfinite(filter_logits(shuffled, top_p=0.7)).tolist() == [[False, True, False, True]]


def test_temperature_scales_logits() -> None:
    p = filter_logits(LOGITS, temperature=0.5).softmax(-1)
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]) ** 2
    assert torch.allclose(p[0], expected / expected.sum(), atol=1e-6)


def test_sampling_frequencies_match_filtered_distribution() -> None:
    n = 20000
    sampler = TokenSampler(TokenSamplerConfig(top_k=3))
    logits_fn = lambda tokens, cond: LOGITS.expand(tokens.shape[0], -1)
    g = torch.Generator().manual_seed(0)
    out = sampler.sample(logits_fn, torch.zeros(n, 0, dtype=torch.long), 1, generator=g)
    freq = torch.bincount(out[:, 0], minlength=4).float() / n
    expected = torch.tensor([0.5, 0.25, 0.15, 0.0]) / 0.9
    # binomial standard error at n=20000 is at most 0.0036; 4.5 sigma
    assert torch.allclose(freq, expected, atol=0.016)


def test_sampler_extends_prefix_autoregressively() -> None:
    # deterministic model: next token = last token + 1 (mod 5)
    def logits_fn(tokens, cond):
        nxt = (tokens[:, -1] + 1) % 5
        return torch.nn.functional.one_hot(nxt, 5).float() * 50.0

    out = TokenSampler(TokenSamplerConfig()).sample(logits_fn, torch.tensor([[3]]), 4)
    assert out.tolist() == [[4, 0, 1, 2]]


def test_logit_cfg_batches_and_mixes() -> None:
    calls = []

    def logits_fn(tokens, cond):
        calls.append(tokens.shape[0])
        drop = cond["drop"]
        cond_logits = torch.tensor([2.0, 0.0])
        uncond_logits = torch.tensor([1.0, 1.0])
        return torch.where(drop[:, None], uncond_logits, cond_logits)

    g = LogitCFG(LogitCFGConfig(scale=3.0))
    out = g.logits(logits_fn, torch.zeros(2, 1, dtype=torch.long), {"y": torch.tensor([1, 1])})
    assert calls == [4]  # one batched forward for both passes
    assert torch.allclose(out, torch.tensor([[4.0, -2.0]] * 2))  # l_u + 3 (l_c - l_u)
    scale_one = LogitCFG(LogitCFGConfig(scale=1.0)).logits(
        logits_fn, torch.zeros(2, 1, dtype=torch.long), {"y": torch.tensor([0, 0])}
    )
    assert torch.allclose(scale_one, torch.tensor([[2.0, 0.0]] * 2))  # s = 1 is the conditional model


def test_config_validation() -> None:
    with pytest.raises(Exception, match="temperature"):
        TokenSamplerConfig(temperature=0)
