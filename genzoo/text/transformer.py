"""A transformer text encoder over open_clip's BPE tokens, and the encoder component built on it.

The text tower of CLIP (Radford et al. 2021, Sec. 2.4) and of GLIDE (Nichol et al. 2021, Sec. 2.3):
causal pre-LN blocks (the shared GPT's), the output at the end-of-text token is the pooled
embedding, the per-token outputs are the sequence the U-Net attends to. Causal attention means
the padding after EOT can never reach the pooled output, so no padding mask is needed inside.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from genzoo.data.tokenizer import CaptionTokens
from genzoo.interfaces import Condition, Encoder, Spec
from genzoo.nn.gpt import GPT, Block, TransformerSize
from genzoo.registry import component


class TextTransformerConfig(TransformerSize):
    context: int = Field(32, ge=3, description="tokens per caption incl. start and end; longer captions are cut")
    # GLIDE's text transformer (Nichol et al. 2021, Sec. 2.3; glide-text2im's Text2ImUNet), for imported weights
    causal: bool = Field(True, description="causal attention (CLIP); False: every token sees every other (GLIDE)")
    pool: Literal["eot", "last"] = Field(
        "eot", description="the pooled output: the end-of-text token's (CLIP), or the last position's (GLIDE)"
    )
    padding_embedding: bool = Field(
        False,
        description="a learned embedding per position replaces the token embedding at padding positions "
        "(GLIDE's xf_padding; the caller marks them)",
    )
    vocab_size: int | None = Field(
        None,
        ge=2,
        description="rows of the token embedding; None: open_clip's BPE vocabulary, which tokenize uses. "
        "Imported towers set it (GLIDE's GPT-2 BPE: 50257, tokenised outside; GLIDE's noised CLIP: 65536)",
    )


class TextTransformer(nn.Module):
    """``forward(tokens) -> (pooled (B, W), sequence (B, L, W), mask (B, L))``; ``tokenize(list[str]) -> tokens``."""

    def __init__(self, cfg: TextTransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._tokens: CaptionTokens | None = None
        gpt = cfg.gpt_config(
            vocab_size=cfg.vocab_size or self.tokenize.tokenizer.vocab_size,
            block_size=cfg.context,
            where="text-transformer",
        ).model_copy(update={"causal": cfg.causal})
        self.token_embedding = nn.Embedding(gpt.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context, cfg.width))
        if cfg.padding_embedding:
            self.padding_embedding = nn.Parameter(torch.zeros(cfg.context, cfg.width))
        self.blocks = nn.ModuleList(Block(gpt) for _ in range(cfg.layers))
        self.ln_final = nn.LayerNorm(cfg.width)
        self.apply(GPT._init_weights)
        nn.init.normal_(self.positional_embedding, std=0.01)

    @property
    def tokenize(self) -> CaptionTokens:
        """Captions -> (B, context) open_clip BPE ids; made on first use (importing open_clip takes seconds)."""
        if self._tokens is None:
            self._tokens = CaptionTokens(self.cfg.context)
        return self._tokens

    @property
    def width(self) -> int:
        return self.cfg.width

    def forward(self, tokens: Tensor, padding: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``padding`` (B, L), True after the caption, selects the padding embedding (``padding_embedding``)."""
        tokens = tokens[:, : self.cfg.context]
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        if padding is not None and self.cfg.padding_embedding:
            x = torch.where(padding[:, : tokens.shape[1], None], self.padding_embedding[: tokens.shape[1]], x)
        for block in self.blocks:
            x, _ = block(x)
        x = self.ln_final(x)
        if self.cfg.pool == "last":  # GLIDE: non-causal, so the last position has seen the whole caption
            return x[:, -1], x, torch.ones(tokens.shape, dtype=torch.bool, device=tokens.device)
        # EOT has the largest id in open_clip's vocabulary, so argmax finds it (as CLIP does); a caption
        # cut at the context length ends in EOT too (BPETokenizer.encode)
        eot = tokens.argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot]
        mask = torch.arange(tokens.shape[1], device=tokens.device) <= eot[:, None]
        return pooled, x, mask


@component("network", "text-transformer", config=TextTransformerConfig)
def build_text_transformer(cfg: TextTransformerConfig, ctx: Any = None) -> TextTransformer:
    """A causal transformer over BPE tokens (GLIDE, CLIP text tower): per-token states and a pooled one."""
    return TextTransformer(cfg)


@component("encoder", "text-transformer", config=TextTransformerConfig)
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
