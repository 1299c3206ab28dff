"""GLIDE's noised CLIP (Nichol et al. 2021, Sec. 2.4; glide_text2im/clip): its image encoder as a genzoo network.

The image encoder is a ViT (Dosovitskiy et al. 2021) whose first token is a learned embedding of the diffusion step
t instead of a class token, so that it reads noised images; it sits in genzoo's ``clip`` as the ``image_tower`` (the
text tower is genzoo's own text transformer, causal, pooled at the end-of-text token). Built from genzoo's
transformer blocks (non-causal here).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.nn.gpt import Block, GPTConfig
from genzoo.registry import component

# CLIP's image statistics on the [0, 255] scale (glide_text2im/clip/encoders.py, as in Radford et al. 2021)
MEAN = (122.77093945, 116.74601272, 104.09373519)
STD = (68.50053285, 66.63215831, 70.32316309)


class NoisedViTConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: int | None = Field(None, ge=1, description="image side; None takes the dataset's (GLIDE: 64)")
    in_channels: int | None = Field(None, description="image channels; must be 3 (None takes the dataset's)")
    patch_size: int = Field(4, ge=1, description="side of a patch token")
    width: int = Field(768, ge=8, description="width of the residual stream")
    layers: int = Field(12, ge=1, description="transformer blocks")
    heads: int = Field(12, ge=1, description="attention heads")
    timesteps: int = Field(1000, ge=1, description="diffusion steps with a learned first-token embedding")
    num_classes: int | None = Field(None, ge=1, description="output width: the CLIP's embed_dim (set by the clip)")


class NoisedViT(nn.Module):
    """``forward(x_t, t) -> (B, num_classes)``: images in [-1, 1] at diffusion step t (original index)."""

    def __init__(self, cfg: NoisedViTConfig) -> None:
        super().__init__()
        if cfg.image_size is None or cfg.num_classes is None:
            raise ValueError("NoisedViTConfig: image_size and num_classes must be set (or built for a dataset)")
        if cfg.image_size % cfg.patch_size:
            raise ValueError(
                f"noised-vit: image_size {cfg.image_size} is not a multiple of patch_size {cfg.patch_size}"
            )
        self.cfg, n, w = cfg, (cfg.image_size // cfg.patch_size) ** 2, cfg.width
        self.patch = nn.Conv2d(3, w, cfg.patch_size, stride=cfg.patch_size, bias=False)
        self.time_embedding = nn.Embedding(cfg.timesteps, w)
        self.positional_embedding = nn.Parameter(torch.randn(n + 1, w) / w**0.5)
        self.ln_pre = nn.LayerNorm(w)
        gpt = GPTConfig(vocab_size=1, block_size=n + 1, n_layer=cfg.layers, n_head=cfg.heads, n_embd=w, causal=False)
        self.blocks = nn.ModuleList(Block(gpt) for _ in range(cfg.layers))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Linear(w, cfg.num_classes, bias=False)
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        x = ((x.float() + 1) * 127.5 - self.mean) / self.std  # CLIP's normalisation of [0, 255] pixels
        h = self.patch(x).flatten(2).transpose(1, 2)
        h = torch.cat([self.time_embedding(t.long().clamp(0, self.cfg.timesteps - 1))[:, None], h], dim=1)
        h = self.ln_pre(h + self.positional_embedding)
        for block in self.blocks:
            h, _ = block(h)
        return self.proj(self.ln_post(h[:, 0]))


@component("network", "noised-vit", config=NoisedViTConfig)
def build_noised_vit(cfg: NoisedViTConfig, ctx: Any = None) -> NoisedViT:
    """GLIDE's noised CLIP image encoder: a ViT whose first token embeds the diffusion step."""
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(update={"image_size": cfg.image_size or h, "in_channels": cfg.in_channels or c})
    if cfg.in_channels not in (None, 3):
        raise ValueError(f"noised-vit: in_channels is {cfg.in_channels}; GLIDE's CLIP reads RGB images")
    return NoisedViT(cfg)
