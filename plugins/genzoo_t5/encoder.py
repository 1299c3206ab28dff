"""A frozen pretrained text encoder (Imagen, Saharia et al. 2022, Sec. 2.1: a frozen T5-XXL) as genzoo's encoder.

Captions are tokenized by the model's own tokenizer, padded to ``max_length``; the encoder's per-token outputs are
the U-Net's ``context`` (with ``context_mask``, the tokenizer's attention mask), and their masked mean is the pooled
``emb`` added to the time embedding, the two ways GLIDE's U-Net reads a caption. Any text encoder transformers'
``AutoModelForTextEncoding`` loads fits (T5 and mT5 give their encoder stack; BERT-like models themselves).

Frozen: the model never trains, always runs in eval mode and sits outside the module tree, so checkpoints, EMA and
optimisers never hold its weights; a run rebuilds it by name (the Hub cache or a local folder) when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from genzoo.errors import CheckpointError, OfflineError, RegistryError
from genzoo.interfaces import Condition, Encoder, Spec
from genzoo.registry import component


class T5EncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(
        "google-t5/t5-small",
        description="a transformers text encoder: a Hugging Face Hub id (fetched once into the Hub cache) or a local "
        "folder written by save_pretrained (safetensors weights and tokenizer files); Imagen used T5-XXL",
    )
    max_length: int = Field(32, ge=2, description="tokens per caption, end token included; longer captions are cut")

    @field_validator("model")
    @classmethod
    def _absolute(cls, v: str) -> str:  # a local folder stays the same folder from another directory
        path = Path(v).expanduser()
        return str(path.resolve()) if path.exists() else v


class FrozenTextEncoder(Encoder):
    """Captions -> ``context`` (B, L, width), ``context_mask`` (B, L) and ``emb`` (B, width), the masked mean of
    the context; other condition entries pass through. The frozen model is not a child module: ``train()`` leaves it
    in eval mode (no dropout), and ``.to()`` moves it along (``_apply``)."""

    def __init__(self, model: nn.Module, tokenizer: Any, *, max_length: int) -> None:
        super().__init__()
        self.__dict__["model"] = model.eval().requires_grad_(False)  # not a submodule: never saved, never trained
        self.tokenizer, self.max_length = tokenizer, max_length
        self.width = int(model.config.hidden_size)
        self.produces = Spec(shape=(self.width,), condition=frozenset({"emb", "context", "context_mask"}))

    def _apply(self, fn, *args, **kwargs):
        self.model._apply(fn, *args, **kwargs)  # .to(device) moves the frozen model too
        return super()._apply(fn, *args, **kwargs)

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.tokens(captions)[0]

    def tokens(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        batch = self.tokenizer(
            list(captions), padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        device = next(self.model.parameters()).device
        return batch.input_ids.to(device), batch.attention_mask.to(device).bool()

    @torch.no_grad()
    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            ids, mask = self.tokens(condition["caption"])
            seq = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state.float()
            weights = mask.unsqueeze(-1).to(seq.dtype)
            out.update(context=seq, context_mask=mask, emb=(seq * weights).sum(1) / weights.sum(1).clamp(min=1))
        return out


@component("encoder", "t5", config=T5EncoderConfig)
def build_t5_encoder(cfg: T5EncoderConfig, ctx: Any = None) -> FrozenTextEncoder:
    """A frozen pretrained text encoder by name (Imagen's T5): per-token outputs as the U-Net's context."""
    import transformers

    path = Path(cfg.model)
    if path.exists():
        if not path.is_dir() or not any(path.glob("*.safetensors")):
            what = "is a file" if not path.is_dir() else "holds no .safetensors weights"
            raise CheckpointError(
                f"encoder 't5': field 'model': {path} {what}; pass a folder written by save_pretrained with "
                "safe_serialization=True (genzoo never unpickles)"
            )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
        model = transformers.AutoModelForTextEncoding.from_pretrained(cfg.model, use_safetensors=True)
    except OSError as e:
        if path.exists():
            raise RegistryError(f"encoder 't5': transformers could not load {path}: {e}".splitlines()[0]) from e
        raise OfflineError(
            f"encoder 't5': could not load '{cfg.model}' from the Hugging Face Hub or its cache (no network, or no "
            f"such model with safetensors weights); fetch it where there is a network (`hf download "
            f"{cfg.model}`) and run with HF_HUB_OFFLINE=1, or set encoder.model to a local folder"
        ) from e
    return FrozenTextEncoder(model, tokenizer, max_length=cfg.max_length)
