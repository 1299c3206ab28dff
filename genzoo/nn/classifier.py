"""The noisy classifier of classifier guidance: the U-Net's downsampling half, then pooling (ADM Sec. 4)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.nn.embeddings import timestep_embedding
from genzoo.nn.unet import Attention, ConvResample, Level, ResBlock, norm
from genzoo.registry import component


class NoisyClassifierConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    num_classes: int | None = Field(None, description="classes to predict; None takes the dataset's")
    model_channels: int = Field(32, ge=8, description="channels at the first resolution")
    channel_mult: list[int] = Field([1, 2, 2], description="channel multiplier per resolution")
    num_res_blocks: int = Field(1, ge=1, description="residual blocks per resolution")
    attention_resolutions: list[int] = Field([8], description="resolutions with self-attention")
    in_channels: int | None = Field(None, description="image channels; None takes the dataset's")
    image_size: int | None = Field(None, description="image side; None takes the dataset's")
    # ADM's EncoderUNetModel exactly (guided-diffusion's published classifiers: middle block, attention pooling)
    num_head_channels: int = Field(32, ge=1, description="channels per attention head when num_heads is None")
    num_heads: int | None = Field(None, ge=1, description="attention heads per layer; None: from num_head_channels")
    use_scale_shift_norm: bool = Field(True, description="condition by GroupNorm scale and shift rather than addition")
    resblock_updown: bool = Field(
        True, description="downsample inside residual blocks (ADM); False: a stride-2 conv (conv_resample)"
    )
    middle_block: bool = Field(
        False, description="a middle block (residual, attention, residual) after the last resolution, as ADM's"
    )
    pool: Literal["adaptive", "attention"] = Field(
        "adaptive",
        description="adaptive: average over pixels then a linear layer; attention: CLIP's attention pooling "
        "(ADM's pool='attention')",
    )
    norm_groups: int | None = Field(
        None, ge=1, description="GroupNorm groups; None: the largest divisor of the channels <= 32 (ADM: 32)"
    )


class AttentionPool2d(nn.Module):
    """CLIP's attention pooling (Radford et al. 2021, Sec. 2.4; ADM's classifier head): the mean pixel, with a
    learned position per token, queries every pixel; its output is projected to ``out_dim``."""

    def __init__(self, tokens: int, ch: int, head_ch: int, out_dim: int) -> None:
        super().__init__()
        if ch % head_ch:
            raise ValueError(f"attention pooling: {ch} channels do not split into heads of {head_ch}")
        self.heads = ch // head_ch
        self.positional_embedding = nn.Parameter(torch.randn(tokens + 1, ch) / ch**0.5)
        self.qkv, self.proj = nn.Linear(ch, 3 * ch), nn.Linear(ch, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        x = torch.cat([x.mean(dim=1, keepdim=True), x], dim=1) + self.positional_embedding.to(x.dtype)
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in self.qkv(x).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q[:, :, :1], k, v)  # only the mean token's output is read
        return self.proj(out.transpose(1, 2).flatten(2)[:, 0])


class NoisyClassifier(nn.Module):
    """``forward(x_t, t) -> logits``: trained on x_t ~ q(x_t | x_0) at every t, so its gradient guides sampling."""

    def __init__(self, cfg: NoisyClassifierConfig) -> None:
        super().__init__()
        if None in (cfg.num_classes, cfg.in_channels, cfg.image_size):
            raise ValueError(
                "NoisyClassifierConfig: num_classes, in_channels and image_size must be set (or built for a dataset)"
            )
        self.cfg = cfg
        ch0, emb_dim = cfg.model_channels, 4 * cfg.model_channels
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.input_conv = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        norms = dict(groups=cfg.norm_groups, eps=1e-5)
        block = dict(dropout=0.0, scale_shift=cfg.use_scale_shift_norm, **norms)

        def attn(ch: int) -> Attention:
            return Attention(ch, cfg.num_head_channels, None, heads=cfg.num_heads, **norms)

        levels, ch, res = [], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                a = attn(mult * ch0) if res in cfg.attention_resolutions else None  # made first: the seeded init
                levels.append(Level(ResBlock(ch, emb_dim, mult * ch0, **block), a))
                ch = mult * ch0
            if i < len(cfg.channel_mult) - 1:
                down = (
                    ResBlock(ch, emb_dim, ch, resample="down", **block)
                    if cfg.resblock_updown
                    else ConvResample(ch, "down")
                )
                levels.append(Level(down, None))
                res //= 2
        self.levels = nn.ModuleList(levels)
        if cfg.middle_block:
            self.middle = nn.ModuleList(
                [Level(ResBlock(ch, emb_dim, ch, **block), attn(ch)), Level(ResBlock(ch, emb_dim, ch, **block), None)]
            )
        if cfg.pool == "attention":
            self.head = nn.Sequential(
                norm(ch, **norms), nn.SiLU(), AttentionPool2d(res * res, ch, cfg.num_head_channels, cfg.num_classes)
            )
        else:
            self.head = nn.Sequential(
                norm(ch, **norms), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(ch, cfg.num_classes)
            )

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        h = self.input_conv(x)
        for level in (*self.levels, *getattr(self, "middle", ())):
            h = level(h, emb, None, None)
        return self.head(h)


@component("network", "noisy-classifier", config=NoisyClassifierConfig)
def build_noisy_classifier(cfg: NoisyClassifierConfig, ctx=None) -> NoisyClassifier:
    """The ADM encoder half as a classifier of noisy images p(y | x_t, t) (Dhariwal & Nichol 2021)."""
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(
            update={
                "in_channels": cfg.in_channels or c,
                "image_size": cfg.image_size or h,
                "num_classes": cfg.num_classes or data.num_classes,
            }
        )
    return NoisyClassifier(cfg)
