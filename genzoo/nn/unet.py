"""The ADM U-Net (Dhariwal & Nichol 2021, Sec. 3; Nichol & Dhariwal 2021), shared by every image diffusion model.

Residual blocks with scale-shift norm (``GroupNorm(h) * (1 + s) + b`` from the embedding), attention
at chosen resolutions through ``scaled_dot_product_attention`` with a fused qkv projection, zero-
initialised output layers (a fresh model predicts exactly 0), and the conditions of the families
that reuse it: a class embedding (ADM), a pooled embedding added to the time embedding and a token
sequence as extra attention keys/values (GLIDE, unCLIP), a low-resolution image (upsamplers).

``cond["drop"]`` (bool per sample) replaces every condition by its learned null (class index
``num_classes``, a learned null embedding, no context tokens): classifier-free guidance and
training-time dropout use it. GroupNorm uses ``min(32, C // 4)`` groups so small test models work.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.nn.embeddings import timestep_embedding


class UNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    in_channels: int | None = Field(None, description="image channels; None takes the dataset's")
    image_size: int | None = Field(None, description="image side; None takes the dataset's")
    out_channels: int | None = Field(None, description="None: in_channels, doubled when learn_sigma")
    model_channels: int = Field(64, ge=8, description="channels at the first resolution")
    channel_mult: list[int] = Field([1, 2, 2], description="channel multiplier per resolution")
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per resolution")
    attention_resolutions: list[int] = Field([16, 8], description="resolutions (in pixels) with self-attention")
    num_head_channels: int = Field(32, ge=8, description="channels per attention head")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in residual blocks")
    num_classes: int | None = Field(None, description="class-conditional with this many classes (ADM); index num_classes is the null")
    learn_sigma: bool | None = Field(None, description="also output the variance interpolation v (Improved DDPM Eq. 15); None: set by the diffusion decoder's var_type")
    use_scale_shift_norm: bool = Field(True, description="condition by GroupNorm scale and shift (ADM) rather than addition")
    resblock_updown: bool = Field(True, description="down/up-sample inside residual blocks (BigGAN style, ADM)")
    context_dim: int | None = Field(None, description="dim of cond['context'] tokens attended to by every attention layer (GLIDE)")
    emb_dim_in: int | None = Field(None, description="dim of cond['emb'], projected and added to the time embedding")
    cond_channels: int = Field(0, ge=0, description="channels of cond['low_res'], upsampled and concatenated (upsamplers)")


def norm(ch: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, max(1, ch // 4)), ch)


def zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, conditioned on the embedding; optional up/down-sampling (ADM Sec. 3)."""

    def __init__(self, ch: int, emb_dim: int, out_ch: int, *, dropout: float, scale_shift: bool, resample: str = "none") -> None:
        super().__init__()
        self.scale_shift, self.resample = scale_shift, resample
        self.in_norm, self.in_conv = norm(ch), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.out_norm, self.drop = norm(out_ch), nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def _resize(self, x: Tensor) -> Tensor:
        if self.resample == "down":
            return F.avg_pool2d(x, 2)
        if self.resample == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = F.silu(self.in_norm(x))
        h, x = self._resize(h), self._resize(x)
        h = self.in_conv(h)
        e = self.emb(F.silu(emb))[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        h = self.out_conv(self.drop(F.silu(h)))
        return self.skip(x) + h


class Resample(nn.Module):
    """Plain down/up-sampling (DDPM): a stride-2 conv, or nearest upsampling then a conv."""

    def __init__(self, ch: int, resample: str) -> None:
        super().__init__()
        self.resample = resample
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if resample == "down" else 1, padding=1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest") if self.resample == "up" else x)


class Attention(nn.Module):
    """Multi-head self-attention over pixels; context tokens join the keys and values (GLIDE Sec. 2.3)."""

    def __init__(self, ch: int, head_ch: int, context_dim: int | None) -> None:
        super().__init__()
        self.heads = max(1, ch // head_ch)
        self.norm, self.qkv = norm(ch), nn.Linear(ch, 3 * ch)
        self.context_kv = nn.Linear(context_dim, 2 * ch) if context_dim else None
        self.proj = zero(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context).chunk(2, dim=-1)
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            if context_mask is not None:
                keep = torch.cat([context_mask, context_mask.new_ones(b, hgt * wid)], dim=1)
                mask = keep[:, None, None, :]
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=mask)
        out = self.proj(out.transpose(1, 2).flatten(2))
        return x + out.transpose(1, 2).reshape(b, c, hgt, wid)


class Level(nn.Module):
    """One block of the U-Net: a residual block, optionally followed by attention."""

    def __init__(self, res: ResBlock, attn: Attention | None) -> None:
        super().__init__()
        self.res, self.attn = res, attn

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x, context, mask) if self.attn is not None else x


class UNet(nn.Module):
    """``forward(x_t, t, cond) -> eps`` (or [eps, v] with learned sigma), shaped like ``x_t``."""

    def __init__(self, cfg: UNetConfig) -> None:
        super().__init__()
        if cfg.in_channels is None or cfg.image_size is None:
            raise ValueError("UNetConfig: in_channels and image_size must be set (or built for a dataset)")
        self.cfg = cfg
        ch0 = cfg.model_channels
        emb_dim = 4 * ch0
        out_ch = cfg.out_channels or cfg.in_channels * (2 if cfg.learn_sigma else 1)
        self.time_mlp = nn.Sequential(nn.Linear(ch0, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.emb_proj = nn.Linear(cfg.emb_dim_in, emb_dim) if cfg.emb_dim_in else None
        self.null_emb = nn.Parameter(torch.zeros(cfg.emb_dim_in)) if cfg.emb_dim_in else None
        block = dict(dropout=cfg.dropout, scale_shift=cfg.use_scale_shift_norm)

        def attn(ch: int, res: int) -> Attention | None:
            return Attention(ch, cfg.num_head_channels, cfg.context_dim) if res in cfg.attention_resolutions else None

        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, res = [ch0], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(ResBlock(ch, emb_dim, mult * ch0, **block), attn(mult * ch0, res)))
                ch = mult * ch0
                skips.append(ch)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Level(self._resample(ch, emb_dim, "down", block), None))
                skips.append(ch)
                res //= 2
        self.middle = nn.ModuleList([
            Level(ResBlock(ch, emb_dim, ch, **block), Attention(ch, cfg.num_head_channels, cfg.context_dim)),
            Level(ResBlock(ch, emb_dim, ch, **block), None),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for j in range(cfg.num_res_blocks + 1):
                self.up.append(Level(ResBlock(ch + skips.pop(), emb_dim, mult * ch0, **block), attn(mult * ch0, res)))
                ch = mult * ch0
                if i > 0 and j == cfg.num_res_blocks:
                    self.up.append(Level(self._resample(ch, emb_dim, "up", block), None))
                    res *= 2
        self.out = nn.Sequential(norm(ch), nn.SiLU(), zero(nn.Conv2d(ch, out_ch, 3, padding=1)))

    def _resample(self, ch: int, emb_dim: int, kind: str, block: dict) -> nn.Module:
        return ResBlock(ch, emb_dim, ch, resample=kind, **block) if self.cfg.resblock_updown else Resample(ch, kind)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        cond = cond or {}
        drop = cond.get("drop")
        emb = self.time_mlp(timestep_embedding(t, self.cfg.model_channels).to(x.dtype))
        if self.class_emb is not None:
            y = cond.get("y")
            null = torch.full((x.shape[0],), self.cfg.num_classes, device=x.device, dtype=torch.long)
            y = null if y is None else (y if drop is None else torch.where(drop, null, y))
            emb = emb + self.class_emb(y)
        if self.emb_proj is not None:
            e = cond.get("emb")
            e = self.null_emb.expand(x.shape[0], -1) if e is None else (
                e if drop is None else torch.where(drop[:, None], self.null_emb.to(e.dtype), e))
            emb = emb + self.emb_proj(e)
        context, mask = cond.get("context"), cond.get("context_mask")
        if context is not None and drop is not None:  # a dropped caption contributes no tokens
            keep = ~drop[:, None].expand(-1, context.shape[1])
            mask = keep if mask is None else mask & keep
        h = x
        if self.cfg.cond_channels:
            h = torch.cat([x, F.interpolate(cond["low_res"], size=x.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
        h = self.input_conv(h)
        hs = [h]
        for level in self.down:
            h = level(h, emb, context, mask)
            hs.append(h)
        for level in self.middle:
            h = level(h, emb, context, mask)
        for level in self.up:
            if level.res.resample == "up":
                h = level(h, emb, context, mask)
            else:
                h = level(torch.cat([h, hs.pop()], dim=1), emb, context, mask)
        return self.out(h)


def build_unet(cfg: UNetConfig, ctx=None) -> UNet:
    """Build for a dataset: ``in_channels`` and ``image_size`` default to the data's."""
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(update={"in_channels": cfg.in_channels or c, "image_size": cfg.image_size or h})
    return UNet(cfg)

