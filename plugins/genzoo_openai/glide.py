"""GLIDE (Nichol et al. 2021) as glide-text2im releases it: a U-Net that owns its text transformer, and its tokens.

``Text2ImUNet`` encodes the caption itself (its base and its upsampler each have their own transformer), so the
imported denoiser is genzoo's :class:`~genzoo.text.transformer.TextTransformer` (non-causal, last-position pooling,
padding embedding) feeding genzoo's U-Net (``emb_proj`` = transformer_proj, ``context_kv`` = encoder_kv). The
unconditional pass of classifier-free guidance is GLIDE's: the empty caption (every position padding), encoded by
the same transformer (text2im.ipynb), rather than a learned null. Captions become GPT-2 byte-level BPE tokens
(glide_text2im/tokenizer/bpe.py's vocabulary files), lower-cased, cut or padded with the end token to ``text_ctx``.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import GenzooError
from genzoo.interfaces import Condition, Encoder, Spec
from genzoo.nn.unet import UNetConfig, build_unet
from genzoo.registry import component
from genzoo.text.transformer import TextTransformer, TextTransformerConfig

DROPS = ("drop", "drop_context", "drop_emb")


class GlideUNetConfig(UNetConfig):
    text: TextTransformerConfig = Field(
        default_factory=lambda: TextTransformerConfig(
            context=128, causal=False, pool="last", padding_embedding=True, vocab_size=50257
        ),
        description="the caption transformer inside the denoiser (GLIDE's xf_*); its width sets context_dim and "
        "emb_dim_in",
    )


class GlideUNet(nn.Module):
    """``forward(x_t, t, cond)`` with ``cond['glide_tokens']`` (B, text_ctx): the text transformer, then the U-Net
    with its pooled output added to the time embedding and its tokens as extra attention keys and values.
    (``cond['tokens']`` stays the caption in the tokens of a guidance's own text tower, e.g. the noised CLIP's.)"""

    def __init__(self, text: TextTransformer, unet: nn.Module) -> None:
        super().__init__()
        self.text, self.unet = text, unet
        self.cfg = unet.cfg
        self.end_token = text.cfg.vocab_size - 1 if text.cfg.vocab_size else 0

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond = dict(cond or {})
        tokens = cond.pop("glide_tokens", None)
        ctx = self.text.cfg.context
        if tokens is None:  # no caption: the empty one, GLIDE's unconditional input
            tokens = torch.full((x.shape[0], ctx), self.end_token, dtype=torch.long, device=x.device)
        drop = None
        for k in DROPS:
            d = cond.pop(k, None)
            drop = d if drop is None else (drop if d is None else drop | d)
        if drop is not None:  # the null half of classifier-free guidance: the empty caption
            tokens = torch.where(drop[:, None], torch.full_like(tokens, self.end_token), tokens)
        # bpe.padded_tokens_and_mask pads with the end token, which a caption's BPE never yields
        pooled, seq, _ = self.text(tokens, padding=tokens == self.end_token)
        return self.unet(x, t, {**cond, "emb": pooled, "context": seq})


@component("network", "glide-unet", config=GlideUNetConfig)
def build_glide_unet(cfg: GlideUNetConfig, ctx: Any = None) -> GlideUNet:
    """GLIDE's Text2ImUNet (glide-text2im): genzoo's text transformer inside genzoo's U-Net, which attends to it."""
    if not cfg.text.vocab_size:
        raise GenzooError("network 'glide-unet': text.vocab_size must be set (GLIDE's GPT-2 BPE has 50257 tokens)")
    width = cfg.text.width
    unet_cfg = UNetConfig.model_validate(
        {**cfg.model_dump(exclude={"text"}), "context_dim": width, "emb_dim_in": width}
    )
    return GlideUNet(TextTransformer(cfg.text), build_unet(unet_cfg, ctx))


# --------------------------------------------------------------------------- GPT-2 byte-level BPE (GLIDE's tokens)


@cache
def byte_symbols() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters: printable Latin-1 bytes stand for themselves,
    the other 68 take code points from 256 up, in byte order (Radford et al. 2019, Sec. 2.2)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(rest)}}


def _read(folder: Path, name: str) -> str:
    for path in (folder / name, folder / f"{name}.gz"):
        if path.is_file():
            return (gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()).decode("utf-8")
    raise GenzooError(
        f"{folder} has no {name} (or {name}.gz): pass the folder of GLIDE's tokenizer files "
        "(glide_text2im/tokenizer/, which holds encoder.json.gz and vocab.bpe.gz)"
    )


class GPT2BPE:
    """``encode(text) -> ids``: GPT-2's byte-level BPE as GLIDE runs it (lower-cased text, GPT-2's pre-split
    pattern, merges applied lowest rank first)."""

    # GPT-2's pre-tokenisation: contractions, letter runs, digit runs, other runs, whitespace
    PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

    def __init__(self, folder: str | Path) -> None:
        import regex

        folder = Path(folder).expanduser()
        self.vocab: dict[str, int] = json.loads(_read(folder, "encoder.json"))
        merges = [tuple(line.split()) for line in _read(folder, "vocab.bpe").split("\n")[1:] if line.strip()]
        self.rank = {pair: i for i, pair in enumerate(merges)}
        self.pattern = regex.compile(self.PATTERN)
        self._words: dict[str, list[int]] = {}

    @property
    def n_vocab(self) -> int:
        return len(self.vocab)

    def _merge(self, word: str) -> list[int]:
        if word not in self._words:
            parts = list(word)
            while len(parts) > 1:
                pairs = {(a, b) for a, b in zip(parts, parts[1:])}
                best = min(pairs, key=lambda p: self.rank.get(p, float("inf")))
                if best not in self.rank:
                    break
                merged, i = [], 0
                while i < len(parts):  # every occurrence of the best pair, left to right
                    if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                        merged.append(parts[i] + parts[i + 1])
                        i += 2
                    else:
                        merged.append(parts[i])
                        i += 1
                parts = merged
            self._words[word] = [self.vocab[p] for p in parts]
        return self._words[word]

    def encode(self, text: str) -> list[int]:
        symbols = byte_symbols()
        ids: list[int] = []
        for piece in self.pattern.findall(text.lower()):
            ids += self._merge("".join(symbols[b] for b in piece.encode("utf-8")))
        return ids

    def padded(self, texts: list[str], context: int) -> Tensor:
        """(B, context) ids: each text's tokens, cut at ``context``, padded with the end token (n_vocab - 1)."""
        out = torch.full((len(texts), context), self.n_vocab - 1, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = self.encode(text)[:context]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out


class GlideTokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bpe: str = Field(..., description="the folder holding GLIDE's encoder.json(.gz) and vocab.bpe(.gz)")
    context: int = Field(128, ge=1, description="tokens per caption (GLIDE's text_ctx)")
    clip_context: int | None = Field(
        None,
        ge=3,
        description="also give the caption as cond['tokens'] in CLIP's BPE at this length, for CLIP guidance with "
        "GLIDE's noised CLIP (77); None: no CLIP tokens",
    )


class GlideTokens(Encoder):
    """Captions -> ``glide_tokens`` in GLIDE's GPT-2 BPE (the ``glide-unet`` denoiser encodes them itself), and,
    with ``clip_context``, ``tokens`` in CLIP's BPE for the noised CLIP's text tower (glide_text2im/clip uses CLIP's
    simple tokenizer, which is open_clip's)."""

    def __init__(self, cfg: GlideTokensConfig) -> None:
        super().__init__()
        self.cfg, self.bpe = cfg, GPT2BPE(cfg.bpe)
        keys = {"glide_tokens", "tokens"} if cfg.clip_context else {"glide_tokens"}
        self.produces = Spec(shape=(cfg.context,), condition=frozenset(keys))
        self.register_buffer("_device", torch.zeros(()), persistent=False)
        self._clip: Any = None

    def tokenize(self, captions: list[str]) -> Tensor:
        """The caption as ``cond['tokens']``: CLIP's BPE with ``clip_context``, else GLIDE's GPT-2 BPE."""
        if self.cfg.clip_context:
            if self._clip is None:
                from genzoo.data.tokenizer import CaptionTokens

                self._clip = CaptionTokens(self.cfg.clip_context)
            return self._clip(list(captions)).to(self._device.device)
        return self.glide_tokens(captions)

    def glide_tokens(self, captions: list[str]) -> Tensor:
        return self.bpe.padded(list(captions), self.cfg.context).to(self._device.device)

    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            out["glide_tokens"] = self.glide_tokens(condition["caption"])
            if self.cfg.clip_context:
                out["tokens"] = self.tokenize(condition["caption"])
        return out


@component("encoder", "glide-tokens", config=GlideTokensConfig)
def build_glide_tokens(cfg: GlideTokensConfig, ctx: Any = None) -> GlideTokens:
    """GLIDE's caption tokens (GPT-2 BPE), for a ``glide-unet`` denoiser."""
    return GlideTokens(cfg)
