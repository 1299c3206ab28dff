"""open_clip's bundled byte-pair tokenizer (Radford et al. 2021), offline: the vocabulary ships in the wheel."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.registry import component


class BPETokenizerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context_length: int = Field(77, ge=3, description="tokens per caption incl. start and end; longer captions are cut")


@component("tokenizer", "bpe", config=BPETokenizerConfig)
class BPETokenizer:
    """``encode(list[str]) -> (B, L)`` long tensor: [SOT, tokens..., EOT, 0...]; ``decode`` inverts it."""

    def __init__(self, cfg: BPETokenizerConfig | None = None) -> None:
        from open_clip.tokenizer import SimpleTokenizer

        self.cfg = cfg or BPETokenizerConfig()
        self.context_length = self.cfg.context_length
        self._tok = SimpleTokenizer(context_length=self.context_length)
        self.vocab_size = len(self._tok.encoder)
        self.sot_id = self._tok.sot_token_id
        self.eot_id = self._tok.eot_token_id
        self.pad_id = 0

    def encode(self, texts: list[str]) -> Tensor:
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.sot_id, *self._tok.encode(text)][: self.context_length - 1] + [self.eot_id]
            out[i, : len(ids)] = torch.tensor(ids)
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        texts = []
        for row in tokens.tolist():
            ids = [t for t in row[1:] if t not in (self.pad_id,)]
            ids = ids[: ids.index(self.eot_id)] if self.eot_id in ids else ids
            texts.append(self._tok.decode(ids).strip())
        return texts


class CaptionTokens:
    """``captions -> (B, L)`` through a :class:`BPETokenizer`, running BPE once per distinct caption
    (datasets repeat their captions, so training pays for tokenising only at the start)."""

    def __init__(self, context_length: int) -> None:
        self.tokenizer = BPETokenizer(BPETokenizerConfig(context_length=context_length))
        self._cache: dict[str, Tensor] = {}

    def __call__(self, captions: list[str]) -> Tensor:
        missing = [c for c in dict.fromkeys(captions) if c not in self._cache]
        if missing:
            for c, row in zip(missing, self.tokenizer.encode(missing)):
                self._cache[c] = row
        return torch.stack([self._cache[c] for c in captions])
