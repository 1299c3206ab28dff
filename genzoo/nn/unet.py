"""The ADM U-Net (Dhariwal & Nichol 2021, Sec. 3; Nichol & Dhariwal 2021), shared by every image diffusion model.

Residual blocks with scale-shift norm (``GN(h) * (1 + s) + b`` from the embedding), attention at
chosen resolutions through ``scaled_dot_product_attention`` with a fused qkv projection, zero-
initialised output layers (a fresh model predicts exactly 0), and the conditions of the families
that reuse it: a class embedding (ADM), a pooled embedding added to the time embedding and a token
sequence as extra attention keys/values (GLIDE Sec. 2.3, unCLIP Sec. 2.1), a low-resolution image
(upsamplers). See docs/networks.md for the cond dict.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from genzoo.nn.embeddings import DenoiserConditions, condition_embedding, either, pooled_or_null, timestep_embedding
from genzoo.registry import component


class UNetConfig(DenoiserConditions):
    model_config = ConfigDict(extra="forbid")
    in_channels: int | None = Field(None, ge=1, description="image channels; None takes the dataset's")
    image_size: int | None = Field(None, ge=1, description="image side; None takes the dataset's")
    out_channels: int | None = Field(None, ge=1, description="None: in_channels, doubled when learn_sigma")
    model_channels: int = Field(64, ge=8, description="channels at the first resolution")
    channel_mult: list[int] = Field(
        [1, 2, 2], min_length=1, description="channel multiplier per resolution; len - 1 halvings"
    )
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per resolution")
    attention_resolutions: list[int] = Field([16, 8], description="resolutions (in pixels) with self-attention")
    middle_attention: bool = Field(
        True,
        description="self-attention in the middle block (ADM always has it); false with attention_resolutions [] "
        "makes the U-Net convolution-only (unCLIP's upsamplers)",
    )
    num_heads: int | None = Field(
        None, ge=1, description="attention heads per layer; None: channels // num_head_channels"
    )
    num_head_channels: int = Field(
        32, ge=1, description="channels per attention head when num_heads is None (ADM uses 64)"
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in residual blocks")
    use_scale_shift_norm: bool = Field(
        True, description="condition by GroupNorm scale and shift (ADM) rather than by addition (DDPM)"
    )
    resblock_updown: bool = Field(
        True,
        description="down/up-sample inside residual blocks (BigGAN style, ADM); False: strided conv / "
        "nearest+conv (DDPM)",
    )
    context_dim: int | None = Field(
        None,
        ge=1,
        description="dim of cond['context'] tokens, projected to extra keys/values of every attention layer (GLIDE)",
    )
    cond_channels: int = Field(
        0, ge=0, description="channels of cond['low_res'], bilinearly upsampled and concatenated to x_t (upsamplers)"
    )
    emb_tokens: int = Field(
        0,
        ge=0,
        description="also project cond['emb'] into this many extra context tokens (unCLIP Sec. 2.1: 4); "
        "needs context_dim and emb_dim_in",
    )
    # the original DDPM layout (Ho et al.'s TF code; diffusers' UNet2DModel of google/ddpm-*): imports map exactly
    flip_sin_to_cos: bool = Field(
        True, description="time embedding [cos, sin] (improved-diffusion); False: [sin, cos] (DDPM)"
    )
    freq_shift: float = Field(
        0.0, ge=0, lt=1.5, description="time embedding frequencies max_period^(-i/(half - freq_shift)); DDPM: 1"
    )
    time_scale: float = Field(
        1.0,
        gt=0,
        description="t is multiplied by this before the time embedding: Improved DDPM's rescale_timesteps "
        "(1000 / T, its 4000-step models)",
    )
    norm_groups: int | None = Field(
        None,
        ge=1,
        description="GroupNorm groups of every norm; None: the largest divisor of the channels <= 32 "
        "leaving >= 2 channels per group",
    )
    norm_eps: float = Field(1e-5, gt=0, description="GroupNorm epsilon (DDPM: 1e-6)")
    downsample_padding: int = Field(
        1,
        ge=0,
        le=1,
        description="padding of the stride-2 conv when resblock_updown is False: 1 on every side; "
        "0: pad right and bottom by one (TF 'SAME', DDPM)",
    )

    @model_validator(mode="after")
    def _check(self) -> UNetConfig:
        halvings = len(self.channel_mult) - 1
        if self.image_size is not None and self.image_size % 2**halvings:
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{halvings} (len(channel_mult) - 1 halvings)"
            )
        if self.emb_tokens and not (self.context_dim and self.emb_dim_in):
            raise ValueError(
                f"emb_tokens={self.emb_tokens} projects cond['emb'] into context tokens: set context_dim and "
                "emb_dim_in too"
            )
        if self.norm_groups is not None:
            widths = {self.model_channels * m for m in [1, *self.channel_mult]}  # every sum of them then too
            if any(w % self.norm_groups for w in widths):
                raise ValueError(f"norm_groups {self.norm_groups} does not divide every width {sorted(widths)}")
        return self


class Resample(str, Enum):
    none = "none"
    up = "up"
    down = "down"


def num_groups(ch: int) -> int:
    """GroupNorm groups: the largest divisor of ``ch`` that is <= 32 and leaves >= 2 channels per group.

    32 for every ADM width (64, 128, 192, ...); fewer for the narrow layers of test-sized models, where
    32 groups would be 1-channel instance norm (or not divide ``ch`` at all).
    """
    return max(g for g in range(1, min(32, max(1, ch // 2)) + 1) if ch % g == 0)


def norm(ch: int, groups: int | None = None, eps: float = 1e-5) -> nn.GroupNorm:
    return nn.GroupNorm(groups or num_groups(ch), ch, eps=eps)


def zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a residual branch's last layer, so every block starts as the identity (ADM)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def resize(x: Tensor, mode: Resample) -> Tensor:
    if mode is Resample.down:
        return F.avg_pool2d(x, 2)
    if mode is Resample.up:
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class ResBlock(nn.Module):
    """GN-SiLU-conv twice, conditioned on the embedding; optional up/down-sampling (ADM Sec. 3; BigGAN)."""

    def __init__(
        self,
        ch: int,
        emb_dim: int,
        out_ch: int,
        *,
        dropout: float,
        scale_shift: bool,
        resample: Resample | str = Resample.none,
        groups: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.scale_shift, self.resample = scale_shift, Resample(resample)
        self.in_norm, self.in_conv = norm(ch, groups, eps), nn.Conv2d(ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.out_norm, self.drop = norm(out_ch, groups, eps), nn.Dropout(dropout)
        self.out_conv = zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if ch == out_ch else nn.Conv2d(ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # resample after the first activation, as ADM does, so the conv runs at the new resolution
        h = self.in_conv(resize(F.silu(self.in_norm(x)), self.resample))
        x = resize(x, self.resample)
        e = self.emb(F.silu(emb))[..., None, None]
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.out_norm(h) * (1 + scale) + shift
        else:
            h = self.out_norm(h + e)
        return self.skip(x) + self.out_conv(self.drop(F.silu(h)))


class ConvResample(nn.Module):
    """Plain resampling (DDPM): a stride-2 conv, or nearest upsampling then a conv.

    ``pad=0`` pads the stride-2 conv's input by one on the right and bottom only, as TF's 'SAME' padding
    of the original DDPM code does (diffusers' ``downsample_padding=0``).
    """

    def __init__(self, ch: int, resample: Resample | str, *, pad: int = 1) -> None:
        super().__init__()
        self.resample = Resample(resample)
        down = self.resample is Resample.down
        self.pad = (0, 1, 0, 1) if down and pad == 0 else None
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=1 if self.pad is None else 0)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        if self.pad is not None:
            x = F.pad(x, self.pad)
        return self.conv(resize(x, Resample.up) if self.resample is Resample.up else x)


class Attention(nn.Module):
    """Multi-head self-attention over pixels; context tokens join the keys and values (GLIDE Sec. 2.3)."""

    def __init__(
        self,
        ch: int,
        head_ch: int,
        context_dim: int | None,
        *,
        heads: int | None = None,
        groups: int | None = None,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.heads = heads or max(1, ch // head_ch)
        if ch % self.heads:
            raise ValueError(f"attention: {ch} channels do not split into {self.heads} heads")
        self.norm, self.qkv = norm(ch, groups, eps), nn.Linear(ch, 3 * ch)
        self.context_kv = nn.Linear(context_dim, 2 * ch) if context_dim else None
        self.proj = zero(nn.Linear(ch, ch))

    def forward(self, x: Tensor, context: Tensor | None, context_mask: Tensor | None) -> Tensor:
        b, c, hgt, wid = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(tokens).chunk(3, dim=-1)
        mask = None
        if self.context_kv is not None and context is not None:
            ck, cv = self.context_kv(context.to(x.dtype)).chunk(2, dim=-1)
            k, v = torch.cat([ck, k], dim=1), torch.cat([cv, v], dim=1)
            if context_mask is not None:  # image positions are always visible, so no row is fully masked
                mask = torch.cat([context_mask, context_mask.new_ones(b, hgt * wid)], dim=1)[:, None, None, :]
        q, k, v = (z.unflatten(-1, (self.heads, -1)).transpose(1, 2) for z in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = self.proj(out.transpose(1, 2).flatten(2))  # (B, HW, C)
        return x + out.transpose(1, 2).unflatten(2, (hgt, wid))


class Level(nn.Module):
    """One U-Net stage: a residual (or resampling) block, then attention where configured."""

    def __init__(self, res: nn.Module, attn: Attention | None, *, takes_skip: bool = False) -> None:
        super().__init__()
        self.res, self.attn, self.takes_skip = res, attn, takes_skip

    def forward(self, x: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        x = self.res(x, emb)
        return self.attn(x, context, mask) if self.attn is not None else x


class UNet(nn.Module):
    """``forward(x_t, t, cond) -> eps`` (or ``[eps, v]`` with learned sigma), shaped like ``x_t``.

    ``t`` holds the (possibly rescaled, fractional) timesteps, one per sample.
    """

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
        self.emb_to_tokens = nn.Linear(cfg.emb_dim_in, cfg.emb_tokens * cfg.context_dim) if cfg.emb_tokens else None
        norms = dict(groups=cfg.norm_groups, eps=cfg.norm_eps)
        block = dict(dropout=cfg.dropout, scale_shift=cfg.use_scale_shift_norm, **norms)

        def res(ch: int, out: int) -> ResBlock:
            return ResBlock(ch, emb_dim, out, **block)

        def resample(ch: int, mode: Resample) -> nn.Module:
            if cfg.resblock_updown:
                return ResBlock(ch, emb_dim, ch, resample=mode, **block)
            return ConvResample(ch, mode, pad=cfg.downsample_padding)

        def attn(ch: int, size: int | None = None) -> Attention | None:
            if size is not None and size not in cfg.attention_resolutions:
                return None
            return Attention(ch, cfg.num_head_channels, cfg.context_dim, heads=cfg.num_heads, **norms)

        self.input_conv = nn.Conv2d(cfg.in_channels + cfg.cond_channels, ch0, 3, padding=1)
        self.down = nn.ModuleList()
        skips, ch, size = [ch0], ch0, cfg.image_size
        for i, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                self.down.append(Level(res(ch, mult * ch0), attn(mult * ch0, size)))
                ch = mult * ch0
                skips.append(ch)
            if i < len(cfg.channel_mult) - 1:
                self.down.append(Level(resample(ch, Resample.down), None))
                skips.append(ch)
                size //= 2
        self.middle = nn.ModuleList(
            [Level(res(ch, ch), attn(ch) if cfg.middle_attention else None), Level(res(ch, ch), None)]
        )
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                self.up.append(Level(res(ch + skips.pop(), mult * ch0), attn(mult * ch0, size), takes_skip=True))
                ch = mult * ch0
            if i > 0:
                self.up.append(Level(resample(ch, Resample.up), None))
                size *= 2
        self.out = nn.Sequential(norm(ch, **norms), nn.SiLU(), zero(nn.Conv2d(ch, out_ch, 3, padding=1)))

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        cond = cond or {}
        temb = timestep_embedding(
            t * self.cfg.time_scale if self.cfg.time_scale != 1 else t,
            self.cfg.model_channels,
            flip_sin_to_cos=self.cfg.flip_sin_to_cos,
            freq_shift=self.cfg.freq_shift,
        )
        emb = self.time_mlp(temb.to(x.dtype))
        emb = condition_embedding(emb, cond, class_emb=self.class_emb, emb_proj=self.emb_proj, null_emb=self.null_emb)
        context, mask = cond.get("context"), cond.get("context_mask")
        drop = either(cond.get("drop"), cond.get("drop_context"))
        if context is not None and drop is not None:  # a dropped caption contributes no tokens, as a missing one
            keep = ~drop[:, None].expand(-1, context.shape[1])
            mask = keep if mask is None else mask & keep
        if self.emb_to_tokens is not None:  # unCLIP's z_i as extra tokens; the null embedding where it is dropped
            extra = self.emb_to_tokens(pooled_or_null(cond, self.null_emb, x.shape[0]).to(x.dtype)).view(
                x.shape[0], self.cfg.emb_tokens, -1
            )
            if context is not None:
                mask = torch.cat(
                    [
                        mask if mask is not None else context.new_ones(context.shape[:2], dtype=torch.bool),
                        extra.new_ones(extra.shape[:2], dtype=torch.bool),
                    ],
                    dim=1,
                )
            context = extra if context is None else torch.cat([context.to(x.dtype), extra], dim=1)
        h = x
        if self.cfg.cond_channels:
            if "low_res" not in cond:
                raise ValueError(
                    f"UNet: cond_channels={self.cfg.cond_channels} needs cond['low_res'] (the low-resolution image)"
                )
            low = F.interpolate(cond["low_res"].to(x.dtype), size=x.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([x, low], dim=1)
        h = self.input_conv(h)
        hs = [h]
        for level in self.down:
            h = level(h, emb, context, mask)
            hs.append(h)
        for level in self.middle:
            h = level(h, emb, context, mask)
        for level in self.up:
            h = level(torch.cat([h, hs.pop()], dim=1) if level.takes_skip else h, emb, context, mask)
        return self.out(h)


@component("network", "unet", config=UNetConfig)
def build_unet(cfg: UNetConfig, ctx: Any = None) -> UNet:
    """The ADM U-Net (Dhariwal & Nichol 2021): residual blocks, attention, scale-shift norm; optional text context.

    Build for a dataset: ``in_channels`` and ``image_size`` default to the data's.
    """
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(update={"in_channels": cfg.in_channels or c, "image_size": cfg.image_size or h})
    return UNet(cfg)


def flop_counter() -> FlopCounterMode:
    """``FlopCounterMode`` that also counts the fused CPU attention kernel.

    torch's registry knows the CUDA SDPA kernels but not ``_scaled_dot_product_flash_attention_for_cpu``,
    so on CPU attention would silently count as zero; it is counted here as on CUDA (QK^T and AV).
    """

    def sdpa_cpu(q: torch.Size, k: torch.Size, v: torch.Size, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return sdpa_flop_count(q, k, v)

    return FlopCounterMode(
        display=False, custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa_cpu}
    )


def unet_flops(cfg: UNetConfig, batch: int, cond: dict[str, Tensor] | None = None) -> int:
    """Forward FLOPs (multiply-add = 2) of ``UNet(cfg)`` on ``batch`` images, counted by
    ``torch.utils.flop_counter`` on the meta device: no weights are allocated and nothing runs."""
    with torch.device("meta"):
        net = UNet(cfg)
        x, t = torch.zeros(batch, cfg.in_channels, cfg.image_size, cfg.image_size), torch.zeros(batch)
        with flop_counter() as counter:
            net(x, t, cond)
    return counter.get_total_flops()
