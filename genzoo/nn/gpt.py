"""A decoder-only transformer (GPT-2, Radford et al. 2019; the shape of nanoGPT) for token priors.

Used by the VQ-VAE prior (over code indices), DALL·E (over [text; image] tokens, Ramesh et al.
2021, Sec. 2.2) and the DALL·E 2 autoregressive prior (Ramesh et al. 2022, Sec. 2.2). Conditions
enter as continuous ``prefix_emb`` vectors placed before the tokens (a class embedding, a CLIP
embedding). A :class:`KVCache` makes decoding N tokens cost N one-token forward passes.

Alignment: the sequence is ``s = [prefix; idx]`` and output position ``i`` predicts the token after
``s``'s position ``i``. Outputs start at the last prefix position, so with a prefix ``logits[:, i]``
predicts ``idx[:, i]`` (train with ``targets=idx``); without one it predicts ``idx[:, i + 1]``
(train with ``idx[:, :-1]``, ``targets=idx[:, 1:]``, as nanoGPT). ``logits[:, -1]`` is always the
next token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class GPTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    vocab_size: int = Field(..., ge=1, description="number of token ids (codes, BPE tokens, or both, offset)")
    block_size: int = Field(..., ge=1, description="longest sequence, prefix embeddings included")
    n_layer: int = Field(4, ge=1, description="transformer blocks")
    n_head: int = Field(4, ge=1, description="attention heads; must divide n_embd")
    n_embd: int = Field(128, ge=1, description="width of the residual stream")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residual branches")
    bias: bool = Field(
        True, description="biases in Linear layers and LayerNorms (False: a little faster, GPT-2 used True)"
    )
    causal: bool = Field(True, description="causal attention; False: every position sees every other (GLIDE's text)")


class TransformerSize(BaseModel):
    """A transformer's size in one vocabulary for every transformer config (priors, text towers, DALL·E)."""

    model_config = ConfigDict(extra="forbid")
    layers: int = Field(4, ge=1, description="transformer blocks")
    heads: int = Field(4, ge=1, description="attention heads; must divide width")
    width: int = Field(128, ge=8, description="width of the residual stream")
    context: int | None = Field(None, ge=1, description="positions attended over; None: as many as the data need")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on embeddings, attention and residual branches")

    def gpt_config(self, *, vocab_size: int, block_size: int, where: str) -> GPTConfig:
        """The :class:`GPTConfig` of this size for ``block_size`` positions; refuses a context shorter than that."""
        if self.context is not None and self.context < block_size:
            raise ValueError(
                f"{where}: field 'context' is {self.context} but the sequence needs {block_size} positions; "
                "raise it or leave it unset"
            )
        return GPTConfig(
            vocab_size=vocab_size,
            block_size=self.context or block_size,
            n_layer=self.layers,
            n_head=self.heads,
            n_embd=self.width,
            dropout=self.dropout,
        )


@dataclass
class KVCache:
    """Keys and values of every layer for the positions seen so far: ``layers[i] = (k, v)``, (B, H, L, hd)."""

    layers: list[tuple[Tensor, Tensor]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[2] if self.layers else 0


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise ValueError(f"GPTConfig: n_head={cfg.n_head} does not divide n_embd={cfg.n_embd}")
        self.n_head, self.dropout, self.causal = cfg.n_head, cfg.dropout, cfg.causal
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attend from the T new positions to the ``past`` ones and to themselves; returns the new (k, v)."""
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.n_head, -1).transpose(1, 2) for z in self.c_attn(x).split(c, dim=2))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        offset = k.shape[2] - t
        # is_causal aligns the mask top-left, which is only right without a past; a cached chunk needs
        # the bottom-right mask (query i sees keys <= offset + i), and a single new token sees everything
        mask = None
        if self.causal and offset and t > 1:
            mask = torch.arange(k.shape[2], device=x.device) <= offset + torch.arange(t, device=x.device)[:, None]
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal and not offset and t > 1,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(b, t, c))), (k, v)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm transformer block (GPT-2, Sec. 2.3)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), CausalSelfAttention(cfg)
        self.ln_2, self.mlp = nn.LayerNorm(cfg.n_embd, bias=cfg.bias), MLP(cfg)

    def forward(self, x: Tensor, past: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        a, kv = self.attn(self.ln_1(x), past)
        x = x + a
        return x + self.mlp(self.ln_2(x)), kv


class GPT(nn.Module):
    """``forward(idx, targets, *, prefix_emb, loss_weights, kv_cache) -> (logits, loss)``; see the module doc."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                drop=nn.Dropout(cfg.dropout),
                h=nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying (Press & Wolf 2017)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2's 1/sqrt(N) scaling of residual projections
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        idx: Tensor,
        targets: Tensor | None = None,
        *,
        prefix_emb: Tensor | None = None,
        loss_weights: Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> tuple[Tensor, Tensor | None]:
        """Logits (B, T', V) and, given ``targets`` (B, T'' <= T'), the weighted cross-entropy.

        ``prefix_emb`` (B, P, n_embd) precedes the tokens (first call only when caching);
        ``loss_weights`` (T'') or (B, T'') weight each target (DALL·E: text 1/8, image 7/8 in total);
        targets equal to -1 are ignored. ``kv_cache`` is extended in place with the new positions.
        """
        x = self.transformer.wte(idx)
        if prefix_emb is not None:
            x = torch.cat([prefix_emb.to(x.dtype), x], dim=1)
        start = kv_cache.length if kv_cache is not None else 0
        if start + x.shape[1] > self.cfg.block_size:
            raise ValueError(
                f"GPT: sequence of {start + x.shape[1]} positions exceeds block_size={self.cfg.block_size}"
            )
        x = self.transformer.drop(x + self.transformer.wpe(torch.arange(start, start + x.shape[1], device=idx.device)))
        new_layers = []
        for i, block in enumerate(self.transformer.h):
            x, kv = block(x, kv_cache.layers[i] if kv_cache is not None and kv_cache.layers else None)
            new_layers.append(kv)
        if kv_cache is not None:
            kv_cache.layers = new_layers
        n_prefix = 0 if prefix_emb is None else prefix_emb.shape[1]
        logits = self.lm_head(self.transformer.ln_f(x[:, max(n_prefix - 1, 0) :]))
        if targets is None:
            return logits, None
        ce = F.cross_entropy(
            logits[:, : targets.shape[1]].flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="none"
        )
        w = (targets != -1).to(ce.dtype)
        if loss_weights is not None:
            w = w * loss_weights.to(ce.dtype).expand_as(targets)
        return logits, (ce * w.flatten()).sum() / w.sum()


class CachedLogits:
    """A logits function for genzoo's ``TokenSampler`` (``(tokens, condition) -> (B, V)``) backed by a
    :class:`KVCache`: a call that extends the previous tokens by one feeds only that token.

    Any other call (the first, a new batch size, a new prompt length) restarts the cache from the
    full sequence; make one per sampling run. ``prefix(condition)`` turns the condition into
    ``prefix_emb`` (None: no prefix).
    """

    def __init__(
        self, gpt: GPT, *, prefix: Callable[[Mapping[str, Tensor] | None], Tensor | None] | None = None
    ) -> None:
        self.gpt, self.prefix = gpt, prefix
        self.cache, self.seen, self.batch = KVCache(), -1, -1

    @torch.no_grad()
    def __call__(self, tokens: Tensor, condition: Mapping[str, Tensor] | None = None) -> Tensor:
        if tokens.shape[0] == self.batch and tokens.shape[1] == self.seen + 1:
            logits, _ = self.gpt(tokens[:, -1:], kv_cache=self.cache)
        else:
            self.cache = KVCache()
            prefix_emb = self.prefix(condition) if self.prefix is not None else None
            logits, _ = self.gpt(tokens, prefix_emb=prefix_emb, kv_cache=self.cache)
        self.batch, self.seen = tokens.shape
        return logits[:, -1]
