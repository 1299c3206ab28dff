"""Autoregressive token sampling and logit guidance, shared by VQ-VAE priors, DALL·E and the AR prior.

A *logits function* ``logits_fn(tokens, condition) -> (B, V)`` returns the next-token logits
given the tokens so far (B, L) and a condition dict; the sampler never knows what model is
behind it. Guidance acts on logits (classifier-free guidance, Ho & Salimans 2021, applied to
logits as in Crowson's and Gafni et al.'s token models: ``l_u + s (l_c - l_u)``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.interfaces import Condition, Guidance, Sampler, SamplerKind, with_null_condition
from genzoo.registry import component

LogitsFn = Callable[[Tensor, "Condition | None"], Tensor]


class TokenGuidance(Guidance):
    """Base token guidance: calls the model once; subclasses change the logits."""

    kind = SamplerKind.TOKEN

    def logits(self, logits_fn: LogitsFn, tokens: Tensor, condition: Condition | None) -> Tensor:
        return logits_fn(tokens, condition)


class LogitCFGConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    scale: float = Field(3.0, description="guidance scale s; 1 means no guidance (GLIDE's convention)")


@component("guidance", "logit-cfg", config=LogitCFGConfig)
class LogitCFG(TokenGuidance):
    """Classifier-free guidance on logits: ``l_u + s (l_c - l_u)``, both passes in one batch."""

    def __init__(self, cfg: LogitCFGConfig) -> None:
        self.scale = cfg.scale

    def logits(self, logits_fn: LogitsFn, tokens: Tensor, condition: Condition | None) -> Tensor:
        if not condition:
            return logits_fn(tokens, condition)
        n = tokens.shape[0]
        both = logits_fn(torch.cat([tokens, tokens]), with_null_condition(condition, n, tokens.device))
        cond, uncond = both[:n], both[n:]
        return uncond + self.scale * (cond - uncond)


class TokenSamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    temperature: float = Field(1.0, gt=0, description="softmax temperature; < 1 sharpens")
    top_k: int | None = Field(None, ge=1, description="keep only the k most likely tokens (None: all)")
    top_p: float | None = Field(
        None, gt=0, le=1, description="nucleus: keep the smallest set with mass >= p (None: all)"
    )


def filter_logits(
    logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None
) -> Tensor:
    """Temperature, then top-k, then top-p (Holtzman et al. 2020); removed tokens get -inf."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches p (the top token always stays)
        drop_sorted = (probs.cumsum(-1) - probs) >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


@component("sampler", "token", config=TokenSamplerConfig)
class TokenSampler(Sampler):
    """Ancestral sampling of ``length`` tokens with temperature, top-k and top-p."""

    kind = SamplerKind.TOKEN

    def __init__(self, cfg: TokenSamplerConfig) -> None:
        self.cfg = cfg

    def nfe(self) -> int:
        return 1  # per token

    @torch.no_grad()
    def sample(
        self,
        logits_fn: LogitsFn,
        prefix: Tensor,
        length: int,
        *,
        condition: Condition | None = None,
        guidance: TokenGuidance | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Extend ``prefix`` (B, P) by ``length`` tokens; returns the new tokens (B, length)."""
        guidance = guidance or TokenGuidance()
        tokens = prefix
        for _ in range(length):
            logits = guidance.logits(logits_fn, tokens, condition).float()
            logits = filter_logits(logits, temperature=self.cfg.temperature, top_k=self.cfg.top_k, top_p=self.cfg.top_p)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens[:, prefix.shape[1] :]
