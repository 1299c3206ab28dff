"""Native import: a diffusers ``UNet2DModel`` whose layout is genzoo's U-Net, weights renamed onto genzoo's modules.

The DDPM layout (Ho et al. 2020; google/ddpm-cifar10-32, ddpm-celebahq-256 and the other google/ddpm-* models)
is genzoo's U-Net with additive time conditioning, conv resampling, one attention head of all channels, and the
options ``flip_sin_to_cos``, ``freq_shift``, ``norm_groups``, ``norm_eps`` and ``downsample_padding``. A config
that differs anywhere else is reported with the field, and the importer uses the adapter instead.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
# diffusers' field -> the value genzoo's U-Net requires for an exact mapping
REQUIRED = {
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "center_input_sample": False,
    "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2D",
    "mid_block_scale_factor": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}


def native_unet_config(cfg: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """genzoo ``UNetConfig`` fields equal to a ``UNet2DModel`` config, or (None, the first field that differs)."""
    from diffusers import UNet2DModel

    full = {**{k: p.default for k, p in _init_params(UNet2DModel).items()}, **dict(cfg)}
    for field, want in REQUIRED.items():
        if full.get(field, want) != want:
            return None, f"{field} is {full[field]!r} (genzoo's U-Net: {want!r})"
    widths, down, up = list(full["block_out_channels"]), list(full["down_block_types"]), list(full["up_block_types"])
    if any(b not in DOWN for b in down) or any(b not in UP for b in up):
        return None, f"block types {down} / {up} (genzoo's U-Net: {sorted(DOWN)} / {sorted(UP)})"
    attn = [DOWN[b] for b in down]
    if attn != [UP[b] for b in reversed(up)]:
        return None, "down_block_types and up_block_types put attention at different resolutions"
    ch0 = widths[0]
    if ch0 < 8 or any(w % ch0 for w in widths):
        return None, f"block_out_channels {widths} are not multiples of the first (>= 8)"
    size = full["sample_size"]
    if isinstance(size, (list, tuple)):
        if len(set(size)) != 1:
            return None, f"sample_size {size} is not square"
        size = size[0]
    if not isinstance(size, int) or size % 2 ** (len(widths) - 1):
        return None, f"sample_size {size!r} is not an integer divisible by 2^{len(widths) - 1}"
    head = full["attention_head_dim"]
    attn_widths = [w for w, a in zip(widths, attn) if a] + [widths[-1]]  # the middle block always attends
    if head is not None and any(w % head for w in attn_widths):
        return None, f"attention_head_dim {head} does not divide the attention widths {attn_widths}"
    groups = full["norm_num_groups"]
    if full.get("attn_norm_num_groups") not in (None, groups):
        return None, f"attn_norm_num_groups {full['attn_norm_num_groups']} differs from norm_num_groups {groups}"
    if full["downsample_padding"] not in (0, 1):
        return None, f"downsample_padding is {full['downsample_padding']} (genzoo's U-Net: 0 or 1)"
    return {
        "in_channels": full["in_channels"],
        "out_channels": full["out_channels"],
        "image_size": size,
        "model_channels": ch0,
        "channel_mult": [w // ch0 for w in widths],
        "num_res_blocks": full["layers_per_block"],
        "attention_resolutions": [size // 2**i for i, a in enumerate(attn) if a],
        "num_heads": 1 if head is None else None,
        "num_head_channels": head or ch0,
        "dropout": full["dropout"],
        "use_scale_shift_norm": False,
        "resblock_updown": False,
        "flip_sin_to_cos": full["flip_sin_to_cos"],
        "freq_shift": float(full["freq_shift"]),
        "norm_groups": groups,
        "norm_eps": full["norm_eps"],
        "downsample_padding": full["downsample_padding"],
    }, ""


def _init_params(cls: type) -> dict[str, Any]:
    import inspect

    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def native_state_dict(sd: Mapping[str, Tensor], unet_cfg: Mapping[str, Any]) -> dict[str, Tensor]:
    """``UNet2DModel.state_dict()`` renamed onto the ``UNet`` of ``native_unet_config``; every tensor is used once."""
    out: dict[str, Tensor] = {}
    used: set[str] = set()

    def take(dst: str, src: str, *, optional: bool = False) -> None:
        for p in ("weight", "bias"):
            if f"{src}.{p}" in sd:
                out[f"{dst}.{p}"] = sd[f"{src}.{p}"]
                used.add(f"{src}.{p}")
            elif not optional:
                raise KeyError(f"{src}.{p}")

    def res(dst: str, src: str) -> None:  # ResnetBlock2D -> ResBlock
        for a, b in (
            ("in_norm", "norm1"),
            ("in_conv", "conv1"),
            ("emb", "time_emb_proj"),
            ("out_norm", "norm2"),
            ("out_conv", "conv2"),
        ):
            take(f"{dst}.{a}", f"{src}.{b}")
        take(f"{dst}.skip", f"{src}.conv_shortcut", optional=True)

    def attn(dst: str, src: str) -> None:  # Attention (separate q, k, v) -> Attention (fused qkv)
        take(f"{dst}.norm", f"{src}.group_norm")
        for p in ("weight", "bias"):
            names = [f"{src}.{q}.{p}" for q in ("to_q", "to_k", "to_v")]
            out[f"{dst}.qkv.{p}"] = torch.cat([sd[n] for n in names], dim=0)
            used.update(names)
        take(f"{dst}.proj", f"{src}.to_out.0")

    def blocks(side: str, depth: int) -> None:  # {side}_blocks -> genzoo's {side} levels, a resampler between levels
        k = 0
        for i in range(levels):
            rate = 2**i if side == "down" else 2 ** (levels - 1 - i)  # up_blocks run from the coarsest level
            for j in range(depth):
                res(f"{side}.{k}.res", f"{side}_blocks.{i}.resnets.{j}")
                if size // rate in attends:
                    attn(f"{side}.{k}.attn", f"{side}_blocks.{i}.attentions.{j}")
                k += 1
            if i < levels - 1:
                take(f"{side}.{k}.res.conv", f"{side}_blocks.{i}.{side}samplers.0.conv")
                k += 1

    levels, layers = len(unet_cfg["channel_mult"]), unet_cfg["num_res_blocks"]
    size, attends = unet_cfg["image_size"], set(unet_cfg["attention_resolutions"])
    take("time_mlp.0", "time_embedding.linear_1")
    take("time_mlp.2", "time_embedding.linear_2")
    take("input_conv", "conv_in")
    blocks("down", layers)
    res("middle.0.res", "mid_block.resnets.0")
    attn("middle.0.attn", "mid_block.attentions.0")
    res("middle.1.res", "mid_block.resnets.1")
    blocks("up", layers + 1)
    take("out.0", "conv_norm_out")
    take("out.2", "conv_out")
    left = sorted(set(sd) - used)
    if left:
        raise KeyError(f"UNet2DModel weights without a place in genzoo's U-Net: {left[:3]}")
    return out
