"""A transformer text encoder over open_clip's BPE tokens, and the encoder component built on it.

The text tower of CLIP (Radford et al. 2021, Sec. 2.4) and of GLIDE (Nichol et al. 2021, Sec. 2.3):
causal pre-LN blocks (the shared GPT's), the output at the end-of-text token is the pooled
embedding, the per-token outputs are the sequence the U-Net attends to. Causal attention means
the padding after EOT can never reach the pooled output, so no padding mask is needed inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from pydantic import Field
from torch import Tensor, nn

from genzoo.data.tokenizer import CaptionTokens
from genzoo.interfaces import Condition, Encoder, Spec
from genzoo.nn.gpt import GPT, Block, TransformerSize


class TextTransformerConfig(TransformerSize):
    context: int = Field(32, ge=3, description="tokens per caption incl. start and end; longer captions are cut")


class TextTransformer(nn.Module):
    """``forward(tokens) -> (pooled (B, W), sequence (B, L, W), mask (B, L))``; ``tokenize(list[str]) -> tokens``."""

    def __init__(self, cfg: TextTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tokenize = CaptionTokens(cfg.context)
        gpt = cfg.gpt_config(
            vocab_size=self.tokenize.tokenizer.vocab_size, block_size=cfg.context, where="text-transformer"
        )
        self.token_embedding = nn.Embedding(gpt.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(gpt) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.apply(GPT._init_weights)
        nn.init.normal_(self.positional_embedding, std=0.01)

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        tokens = tokens[:, : self.cfg.context]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        for block in self.blocks:
            x, _ = block(x)
        x = self.ln_final(x)
        # EOT has the largest id in open_clip's vocabulary, so argmax finds it (as CLIP does); a caption
        # cut at the context length ends in EOT too (BPETokenizer.encode)
        eot = tokens.argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        mask = torch.arange(tokens.shape[1], device=tokens.device) <= eot[:, None]
        return pooled, x, mask


def build_text_transformer(cfg: TextTransformerConfig, ctx: Any = None) -> TextTransformer:
    """A causal transformer over BPE tokens (GLIDE, CLIP text tower): per-token states and a pooled one."""
    return TextTransformer(cfg)


class TextEncoder(Encoder):
    """Captions -> ``emb`` (pooled, the final token), ``context`` + ``context_mask`` (every token) and
    ``tokens`` (for a guidance with its own text tower, e.g. CLIP's): GLIDE's text encoder, trained
    with the decoder."""

    def __init__(self, cfg: TextTransformerConfig) -> None:
        super().__init__()
        self.transformer = TextTransformer(cfg)
        self.produces = Spec(shape=(cfg.width,), condition=frozenset({"emb", "context", "context_mask", "tokens"}))

    @property
    def width(self) -> int:
        return self.transformer.width

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.transformer.tokenize(list(captions)).to(self.transformer.positional_embedding.device)

    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            tokens = self.tokenize(condition["caption"])
            pooled, seq, mask = self.transformer(tokens)
            out.update(emb=pooled, context=seq, context_mask=mask, tokens=tokens)
        return out
