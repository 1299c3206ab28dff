"""DALL·E's transformer (Ramesh et al. 2021, Sec. 2.2): the shared GPT over [text tokens; image tokens].

The sequence is ``text_length`` text tokens, then the image's code grid in raster order. A text
position without a token holds its own padding token (``pad_i`` for position i, Sec. 2.2), and a
caption dropped for classifier-free guidance is all padding. The loss weighs the text cross-
entropy 1/8 and the image's 7/8 (each a mean over its positions). Vocabulary, in this order:
text slots, the text_length padding tokens, the K image codes.

Text slots: open_clip's BPE has 49408 ids, and an output layer over all of them would cost far
more than the image part on CPU. The first ``text_vocab_size - 1`` distinct BPE ids met in
training get their own slot (assigned in order of appearance, kept in a buffer, so checkpoints
and resumes agree); any later id shares the last, "unknown" slot. At sampling time no slot is
assigned: a word the model never saw is unknown to it, as it would be anyway.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.data.tokenizer import CaptionTokens
from genzoo.errors import GenzooError
from genzoo.interfaces import Condition, Encoder, SamplerKind, Spec
from genzoo.nn.gpt import GPT, CachedLogits, TransformerSize
from genzoo.priors import SizedPrior
from genzoo.registry import component

BPE_VOCAB = 49408  # open_clip's SimpleTokenizer


class BPETokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    context_length: int = Field(16, ge=3, description="tokens per caption incl. start and end; longer captions are cut")


@component("encoder", "bpe-tokens", config=BPETokensConfig)
class BPETokensEncoder(Encoder):
    """Captions -> ``tokens`` (B, L): open_clip's BPE ids, no parameters (DALL·E's text input)."""

    def __init__(self, cfg: BPETokensConfig) -> None:
        super().__init__()
        self.tokenize_cpu = CaptionTokens(cfg.context_length)
        self.produces = Spec(condition=frozenset({"tokens"}))
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.tokenize_cpu(list(captions)).to(self._device_probe.device)

    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            out["tokens"] = self.tokenize(condition["caption"])
        return out


class DalleTransformerConfig(TransformerSize):
    model_config = ConfigDict(extra="forbid")
    text_length: int = Field(16, ge=2, description="text positions (DALL·E: 256)")
    text_vocab_size: int = Field(256, ge=2, description="text slots incl. the shared unknown slot (see the module doc)")
    text_loss_weight: float = Field(
        1 / 8, ge=0, le=1, description="weight of the text loss; the image gets 1 - this (DALL·E: 1/8)"
    )
    cond_drop: float = Field(
        0.1, ge=0, le=1, description="probability of dropping the caption in training (for logit CFG)"
    )
    shape: list[int] | None = Field(None, description="code grid (h, w); None: the tokenizer's")
    vocab_size: int | None = Field(None, description="image codes K; None: the tokenizer's")


class DalleTransformer(SizedPrior):
    """The prior P(image tokens | text tokens) of DALL·E, sampled by any token sampler and guidance."""

    sampler_kind = SamplerKind.TOKEN

    def __init__(self, cfg: DalleTransformerConfig) -> None:
        self.cfg, self.vocab_size = cfg, cfg.vocab_size
        super().__init__(cfg.shape, dtype="long")
        self.needs_condition = frozenset({"tokens"})

    def bind(self, consumes: Spec) -> None:
        self.vocab_size = self.vocab_size or consumes.vocab_size
        super().bind(consumes)

    def _build(self, shape: tuple[int, ...]) -> None:
        if self.vocab_size is None:
            raise GenzooError(
                "prior 'dalle-transformer' has no vocab_size: set it or compose it with a tokenizer decoder"
            )
        c = self.cfg
        self.produces = Spec(shape=shape, dtype="long", vocab_size=self.vocab_size)
        self.image_offset = c.text_vocab_size + c.text_length
        self.gpt = GPT(
            c.gpt_config(
                vocab_size=self.image_offset + self.vocab_size,
                block_size=c.text_length + math.prod(shape),
                where="prior 'dalle-transformer'",
            )
        )
        unknown = c.text_vocab_size - 1
        self.register_buffer("slot_of", torch.full((BPE_VOCAB,), unknown, dtype=torch.long))
        self.register_buffer("slots_used", torch.zeros((), dtype=torch.long))

    def _assign_slots(self, tokens: Tensor) -> None:
        ids = torch.unique(tokens[tokens > 0])
        new = ids[self.slot_of[ids] == self.cfg.text_vocab_size - 1]
        room = self.cfg.text_vocab_size - 1 - int(self.slots_used)
        if len(new) and room > 0:
            new = new[:room]
            self.slot_of[new] = self.slots_used + torch.arange(len(new), device=new.device)
            self.slots_used += len(new)

    def text_tokens(self, condition: Condition | None, batch: int, *, learn: bool = False) -> Tensor:
        """(B, text_length) text ids: slots, and position i's own pad where no token is or the caption is dropped."""
        c, dev = self.cfg, self.device
        pads = c.text_vocab_size + torch.arange(c.text_length, device=dev)
        cond = condition or {}
        if "tokens" not in cond:
            return pads.expand(batch, -1)
        tokens = F.pad(cond["tokens"], (0, max(0, c.text_length - cond["tokens"].shape[1])))[:, : c.text_length].to(dev)
        if learn:
            self._assign_slots(tokens)
        text = torch.where(tokens > 0, self.slot_of[tokens], pads)
        if cond.get("drop") is not None:
            text = torch.where(cond["drop"].view(-1, 1), pads, text)
        return text

    def training_losses(self, codes: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        """1/8 text + 7/8 image next-token cross-entropy (nats per token); the caption dropped with ``cond_drop``."""
        c, flat = self.cfg, codes.flatten(1)
        cond = dict(condition or {})
        if c.cond_drop > 0 and "tokens" in cond:
            cond["drop"] = torch.rand(len(flat), device=flat.device) < c.cond_drop
        seq = torch.cat([self.text_tokens(cond, len(flat), learn=True), flat + self.image_offset], dim=1)
        n_text, n_image = c.text_length - 1, flat.shape[1]
        weights = torch.cat(
            [
                torch.full((n_text,), c.text_loss_weight / n_text),
                torch.full((n_image,), (1 - c.text_loss_weight) / n_image),
            ]
        )
        logits, loss = self.gpt(seq[:, :-1], targets=seq[:, 1:], loss_weights=weights.to(flat.device))
        image_nll = F.cross_entropy(logits[:, n_text:].flatten(0, 1).float(), seq[:, c.text_length :].flatten())
        return {"loss": loss, "image_nll": image_nll.detach()}

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        shape = self._check_bound()
        if sampler is None:
            raise GenzooError(
                "prior 'dalle-transformer' needs a token sampler; add `prior_sampler: {type: token}` to the recipe"
            )
        cached, k = CachedLogits(self.gpt), self.vocab_size

        def logits_fn(image: Tensor, cond: Condition | None) -> Tensor:
            seq = torch.cat([self.text_tokens(cond, len(image)), image + self.image_offset], dim=1)
            return cached(seq)[:, self.image_offset : self.image_offset + k]  # only image codes can follow

        start = torch.zeros((n, 0), dtype=torch.long, device=self.device)
        codes = sampler.sample(
            logits_fn, start, math.prod(shape), condition=condition, guidance=guidance, generator=generator
        )
        return codes.view(n, *shape)


@component("prior", "dalle-transformer", config=DalleTransformerConfig)
def make_dalle_transformer(cfg: DalleTransformerConfig, ctx: Any = None) -> DalleTransformer:
    """DALL·E's transformer: P(image tokens | text tokens), one sequence of [text; image] tokens."""
    return DalleTransformer(cfg)
