"""OpenAI state dicts -> genzoo's modules: the U-Net, the noisy classifier and the text transformer.

Each converter walks the module tree the published constructor builds (improved/guided-diffusion's ``UNetModel`` and
``EncoderUNetModel``, glide-text2im's ``Text2ImUNet``: the same loops over ``channel_mult`` and ``num_res_blocks``)
and takes every key it expects from a :class:`Keys`, which checks its shape, refuses a key taken twice and, at the
end, one left over: the file is consumed exactly. The tensors change only where the layouts differ:

* 1x1 ``Conv1d`` projections (attention qkv / proj_out / encoder_kv, the attention pool) become ``Linear`` weights;
* the legacy attention order (improved-diffusion, GLIDE, guided-diffusion without ``use_new_attention_order``, and
  GLIDE's text transformer) splits heads before q/k/v, so its qkv rows are permuted to genzoo's q/k/v-then-heads;
* ``label_emb`` gains a zero row, genzoo's null class (the published models were not trained with label dropout);
* everything is float32 (the fp16 flags only changed how the models ran).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from genzoo.errors import GenzooError

from .layouts import ClassifierLayout, TextLayout, UNetLayout

Layout = UNetLayout | ClassifierLayout  # the fields their encoders share (_encoder)


class Keys:
    """The file's state dict, handed out once per key with its shape checked; ``finish`` refuses leftovers."""

    def __init__(self, state: dict[str, Tensor], where: str) -> None:
        self.state, self.where, self.taken = state, where, set()

    def take(self, key: str, shape: tuple[int, ...]) -> Tensor:
        if key in self.taken:
            raise GenzooError(f"{self.where}: key {key} would be read twice (a converter bug)")
        if key not in self.state:
            raise GenzooError(
                f"{self.where}: key {key} (shape {tuple(shape)}) is missing; the file is not the model its flags "
                "describe: pass the flags it was trained with"
            )
        value = self.state[key]
        if tuple(value.shape) != tuple(shape):
            raise GenzooError(
                f"{self.where}: key {key} has shape {tuple(value.shape)} but the flags give {tuple(shape)}; "
                "pass the flags it was trained with"
            )
        self.taken.add(key)
        return value.float()

    def finish(self) -> None:
        left = sorted(set(self.state) - self.taken)
        if left:
            raise GenzooError(
                f"{self.where}: {len(left)} key(s) genzoo's layout has no place for, e.g. {left[0]} "
                f"{tuple(self.state[left[0]].shape)}; the file holds more than the flags describe"
            )


def _pair(out: dict[str, Tensor], dst: str, keys: Keys, src: str, weight: tuple[int, ...], *, bias: bool = True):
    out[f"{dst}.weight"] = keys.take(f"{src}.weight", weight)
    if bias:
        out[f"{dst}.bias"] = keys.take(f"{src}.bias", weight[:1])


def _conv1x1(out: dict[str, Tensor], dst: str, keys: Keys, src: str, c_out: int, c_in: int, perm: Tensor | None):
    """A ``Conv1d(c_in, c_out, 1)`` as a ``Linear``, its output rows reordered by ``perm``."""
    w, b = keys.take(f"{src}.weight", (c_out, c_in, 1))[..., 0], keys.take(f"{src}.bias", (c_out,))
    out[f"{dst}.weight"], out[f"{dst}.bias"] = (w, b) if perm is None else (w[perm], b[perm])


def heads_first(parts: int, heads: int, width: int) -> Tensor:
    """Row order taking OpenAI's legacy [head][q|k|v][channel] layout to genzoo's [q|k|v][head][channel]:
    entry ``j * width + h * d + c`` of the result is row ``h * parts * d + j * d + c`` of the legacy weight."""
    d = width // heads
    j, h, c = torch.meshgrid(torch.arange(parts), torch.arange(heads), torch.arange(d), indexing="ij")
    return (h * parts * d + j * d + c).flatten()


def _resblock(out, dst: str, keys: Keys, src: str, ch: int, out_ch: int, emb: int, scale_shift: bool) -> None:
    """ResBlock: in_layers (GroupNorm, SiLU, conv), emb_layers (SiLU, linear), out_layers (GroupNorm, SiLU, dropout,
    conv), skip_connection (a 1x1 conv when the width changes)."""
    _pair(out, f"{dst}.in_norm", keys, f"{src}.in_layers.0", (ch,))
    _pair(out, f"{dst}.in_conv", keys, f"{src}.in_layers.2", (out_ch, ch, 3, 3))
    _pair(out, f"{dst}.emb", keys, f"{src}.emb_layers.1", ((2 if scale_shift else 1) * out_ch, emb))
    _pair(out, f"{dst}.out_norm", keys, f"{src}.out_layers.0", (out_ch,))
    _pair(out, f"{dst}.out_conv", keys, f"{src}.out_layers.3", (out_ch, out_ch, 3, 3))
    if ch != out_ch:
        _pair(out, f"{dst}.skip", keys, f"{src}.skip_connection", (out_ch, ch, 1, 1))


def _attention(out, dst: str, keys: Keys, src: str, ch: int, heads: int, *, legacy: bool, context: int | None):
    """AttentionBlock: norm, qkv and proj_out (Conv1d), and GLIDE's encoder_kv over the text tokens."""
    _pair(out, f"{dst}.norm", keys, f"{src}.norm", (ch,))
    _conv1x1(out, f"{dst}.qkv", keys, f"{src}.qkv", 3 * ch, ch, heads_first(3, heads, ch) if legacy else None)
    if context:
        _conv1x1(out, f"{dst}.context_kv", keys, f"{src}.encoder_kv", 2 * ch, context, heads_first(2, heads, ch))
    _conv1x1(out, f"{dst}.proj", keys, f"{src}.proj_out", ch, ch, None)


def _resample(out, dst: str, keys: Keys, src: str, ch: int, emb: int, layout: Layout, *, up: bool) -> None:
    """A ResBlock with up/down (resblock_updown) or Downsample.op / Upsample.conv."""
    if layout.resblock_updown:
        _resblock(out, dst, keys, src, ch, ch, emb, layout.use_scale_shift_norm)
    else:
        _pair(out, f"{dst}.conv", keys, f"{src}.{'conv' if up else 'op'}", (ch, ch, 3, 3))


def _encoder(out, dst: str, keys: Keys, layout: Layout, c_in: int, emb: int, attn: Any) -> tuple[list[int], int]:
    """The input_blocks and the middle block, which UNetModel and EncoderUNetModel share: the first conv (``c_in``
    inputs), genzoo's ``dst.{g}`` levels (a ResBlock, ``attn(dst, src, ch)`` where ``attention_ds`` has the rate, a
    resample between levels), then ``middle``. Returns the width of every skip connection and the final rate."""
    scale_shift, widths = layout.use_scale_shift_norm, _widths(layout, keys.where)
    ch = layout.model_channels
    _pair(out, "input_conv", keys, "input_blocks.0.0", (ch, c_in, 3, 3))
    chans, ds, k, g = [ch], 1, 0, 0
    for level, width in enumerate(widths):
        for _ in range(layout.num_res_blocks):
            k += 1
            _resblock(out, f"{dst}.{g}.res", keys, f"input_blocks.{k}.0", ch, width, emb, scale_shift)
            ch = width
            if ds in layout.attention_ds:
                attn(f"{dst}.{g}.attn", f"input_blocks.{k}.1", ch)
            chans.append(ch)
            g += 1
        if level != len(widths) - 1:
            k += 1
            _resample(out, f"{dst}.{g}.res", keys, f"input_blocks.{k}.0", ch, emb, layout, up=False)
            chans.append(ch)
            g, ds = g + 1, ds * 2
    _resblock(out, "middle.0.res", keys, "middle_block.0", ch, ch, emb, scale_shift)
    attn("middle.0.attn", "middle_block.1", ch)
    _resblock(out, "middle.1.res", keys, "middle_block.2", ch, ch, emb, scale_shift)
    return chans, ds


def _widths(layout: Layout, where: str) -> list[int]:
    """``int(mult * model_channels)`` per level; genzoo's first conv has model_channels outputs, so mult[0] is 1."""
    mult = layout.channel_mult
    if mult[0] != 1 or any(float(m) != int(m) for m in mult):
        raise GenzooError(
            f"{where}: channel_mult {tuple(mult)} (the 512x512 models) starts its first conv at "
            f"{mult[0]} x model_channels, which genzoo's U-Net cannot represent (its first width is model_channels)"
        )
    return [int(m) * layout.model_channels for m in mult]


def convert_unet(layout: UNetLayout, keys: Keys) -> dict[str, Tensor]:
    """UNetModel / SuperResModel / Text2ImUNet's U-Net -> genzoo ``UNet`` state (``text`` keys excluded)."""
    out: dict[str, Tensor] = {}
    mc, emb = layout.model_channels, 4 * layout.model_channels
    widths, where = _widths(layout, keys.where), keys.where
    if layout.num_head_channels == -1 and layout.num_heads_upsample not in (-1, layout.num_heads):
        raise GenzooError(
            f"{where}: num_heads_upsample={layout.num_heads_upsample} differs from num_heads={layout.num_heads}; "
            "genzoo's U-Net uses one head count throughout"
        )
    scale_shift, legacy = layout.use_scale_shift_norm, not layout.new_attention_order
    context = layout.text.width if layout.text else None

    def attn(dst: str, src: str, ch: int) -> None:
        _attention(out, dst, keys, src, ch, layout.heads(ch), legacy=legacy, context=context)

    _pair(out, "time_mlp.0", keys, "time_embed.0", (emb, mc))
    _pair(out, "time_mlp.2", keys, "time_embed.2", (emb, emb))
    if layout.num_classes:
        label = keys.take("label_emb.weight", (layout.num_classes, emb))
        out["class_emb.weight"] = torch.cat([label, label.new_zeros(1, emb)])
    c_in = layout.in_channels * (2 if layout.super_res else 1)  # SuperResModel: the upsampled low-res image too
    chans, ds = _encoder(out, "down", keys, layout, c_in, emb, attn)
    ch, k, g = chans[-1], 0, 0
    for level, width in reversed(list(enumerate(widths))):
        for i in range(layout.num_res_blocks + 1):
            _resblock(out, f"up.{g}.res", keys, f"output_blocks.{k}.0", ch + chans.pop(), width, emb, scale_shift)
            ch, j = width, 1
            if ds in layout.attention_ds:
                attn(f"up.{g}.attn", f"output_blocks.{k}.1", ch)
                j = 2
            g += 1
            if level and i == layout.num_res_blocks:  # genzoo keeps the upsampling block as a level of its own
                _resample(out, f"up.{g}.res", keys, f"output_blocks.{k}.{j}", ch, emb, layout, up=True)
                g, ds = g + 1, ds // 2
            k += 1
    _pair(out, "out.0", keys, "out.0", (ch,))
    _pair(out, "out.2", keys, "out.2", (layout.out_channels, ch, 3, 3))
    return out


def convert_text(text: TextLayout, keys: Keys, model_channels: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Text2ImUNet's transformer (token_embedding, positional_embedding, padding_embedding, transformer.resblocks,
    final_ln) -> genzoo ``TextTransformer`` state, and its transformer_proj -> the U-Net's ``emb_proj``."""
    w, out = text.width, {}
    if not text.final_ln:
        raise GenzooError(f"{keys.where}: xf_final_ln is False; genzoo's text transformer always ends in a LayerNorm")
    out["token_embedding.weight"] = keys.take("token_embedding.weight", (text.n_vocab, w))
    out["positional_embedding"] = keys.take("positional_embedding", (text.text_ctx, w))
    if text.padding:
        out["padding_embedding"] = keys.take("padding_embedding", (text.text_ctx, w))
    for i in range(text.layers):
        src, dst = f"transformer.resblocks.{i}", f"blocks.{i}"
        _pair(out, f"{dst}.ln_1", keys, f"{src}.ln_1", (w,))
        qkv, b = keys.take(f"{src}.attn.c_qkv.weight", (3 * w, w)), keys.take(f"{src}.attn.c_qkv.bias", (3 * w,))
        perm = heads_first(3, text.heads, w)  # xf.QKVMultiheadAttention splits heads before q/k/v
        out[f"{dst}.attn.c_attn.weight"], out[f"{dst}.attn.c_attn.bias"] = qkv[perm], b[perm]
        _pair(out, f"{dst}.attn.c_proj", keys, f"{src}.attn.c_proj", (w, w))
        _pair(out, f"{dst}.ln_2", keys, f"{src}.ln_2", (w,))
        _pair(out, f"{dst}.mlp.c_fc", keys, f"{src}.mlp.c_fc", (4 * w, w))
        _pair(out, f"{dst}.mlp.c_proj", keys, f"{src}.mlp.c_proj", (w, 4 * w))
    _pair(out, "ln_final", keys, "final_ln", (w,))
    proj: dict[str, Tensor] = {}
    _pair(proj, "emb_proj", keys, "transformer_proj", (4 * model_channels, w))
    return out, proj


def convert_classifier(layout: ClassifierLayout, keys: Keys) -> dict[str, Tensor]:
    """EncoderUNetModel (pool 'adaptive' or 'attention') -> genzoo ``NoisyClassifier`` state."""
    out: dict[str, Tensor] = {}
    mc, emb = layout.model_channels, 4 * layout.model_channels

    def attn(dst: str, src: str, ch: int) -> None:  # create_classifier leaves use_new_attention_order False
        _attention(out, dst, keys, src, ch, ch // layout.num_head_channels, legacy=True, context=None)

    _pair(out, "time_mlp.0", keys, "time_embed.0", (emb, mc))
    _pair(out, "time_mlp.2", keys, "time_embed.2", (emb, emb))
    chans, ds = _encoder(out, "levels", keys, layout, layout.in_channels, emb, attn)
    ch = chans[-1]
    _pair(out, "head.0", keys, "out.0", (ch,))
    if layout.pool == "attention":
        side = layout.image_size // ds
        pos = keys.take("out.2.positional_embedding", (ch, side * side + 1))
        out["head.2.positional_embedding"] = pos.T.contiguous()
        _conv1x1(out, "head.2.qkv", keys, "out.2.qkv_proj", 3 * ch, ch, None)  # QKVAttention: q/k/v before heads
        _conv1x1(out, "head.2.proj", keys, "out.2.c_proj", layout.out_channels, ch, None)
    elif layout.pool == "adaptive":
        w, b = (
            keys.take("out.3.weight", (layout.out_channels, ch, 1, 1)),
            keys.take("out.3.bias", (layout.out_channels,)),
        )
        out["head.4.weight"], out["head.4.bias"] = w[:, :, 0, 0], b
    else:
        raise GenzooError(
            f"{keys.where}: classifier_pool '{layout.pool}' (a spatial pooling over every block's features) is not "
            "one genzoo's noisy classifier has; the published classifiers use 'attention'"
        )
    return out


def unet_config(layout: UNetLayout, time_scale: float) -> dict[str, Any]:
    """genzoo ``UNetConfig`` fields for ``layout`` (GroupNorm32: 32 groups, eps 1e-5)."""
    return {
        "in_channels": layout.in_channels,
        "image_size": layout.image_size,
        "out_channels": layout.out_channels,
        "model_channels": layout.model_channels,
        "channel_mult": [int(m) for m in layout.channel_mult],
        "num_res_blocks": layout.num_res_blocks,
        "attention_resolutions": sorted({layout.image_size // ds for ds in layout.attention_ds}, reverse=True),
        "num_heads": layout.num_heads if layout.num_head_channels == -1 else None,
        "num_head_channels": layout.num_head_channels if layout.num_head_channels != -1 else 32,
        "dropout": layout.dropout,
        "num_classes": layout.num_classes,
        "use_scale_shift_norm": layout.use_scale_shift_norm,
        "resblock_updown": layout.resblock_updown,
        "cond_channels": layout.in_channels if layout.super_res else 0,
        "context_dim": layout.text.width if layout.text else None,
        "emb_dim_in": layout.text.width if layout.text else None,
        "time_scale": time_scale,
        "norm_groups": 32,
    }


def classifier_config(layout: ClassifierLayout) -> dict[str, Any]:
    """genzoo ``NoisyClassifierConfig`` fields for ``layout``."""
    return {
        "num_classes": layout.out_channels,
        "model_channels": layout.model_channels,
        "channel_mult": [int(m) for m in layout.channel_mult],
        "num_res_blocks": layout.num_res_blocks,
        "attention_resolutions": sorted({layout.image_size // ds for ds in layout.attention_ds}, reverse=True),
        "in_channels": layout.in_channels,
        "image_size": layout.image_size,
        "num_head_channels": layout.num_head_channels,
        "use_scale_shift_norm": layout.use_scale_shift_norm,
        "resblock_updown": layout.resblock_updown,
        "middle_block": True,
        "pool": layout.pool,
        "norm_groups": 32,
    }


def text_config(text: TextLayout) -> dict[str, Any]:
    """genzoo ``TextTransformerConfig`` fields for GLIDE's transformer."""
    return {
        "layers": text.layers,
        "heads": text.heads,
        "width": text.width,
        "context": text.text_ctx,
        "causal": False,
        "pool": "last",
        "padding_embedding": text.padding,
        "vocab_size": text.n_vocab,
    }


def _clip_blocks(out: dict[str, Tensor], dst: str, keys: Keys, layers: int, w: int) -> None:
    """glide_text2im/clip TransformerBlocks (f_attn: ln, f_q, f_k without bias, f_v, f_c; f_mlp: ln, f_1, f_2)
    -> genzoo transformer blocks (fused q/k/v, the key's bias zero)."""
    for i in range(layers):
        src, to = f"blocks.block_{i}", f"{dst}.{i}"
        out[f"{to}.ln_1.weight"] = keys.take(f"{src}.f_attn.ln.g", (w,))
        out[f"{to}.ln_1.bias"] = keys.take(f"{src}.f_attn.ln.b", (w,))
        q, k, v = (keys.take(f"{src}.f_attn.f_{n}.w", (w, w)) for n in "qkv")
        out[f"{to}.attn.c_attn.weight"] = torch.cat([q, k, v])
        qb, vb = keys.take(f"{src}.f_attn.f_q.b", (w,)), keys.take(f"{src}.f_attn.f_v.b", (w,))
        out[f"{to}.attn.c_attn.bias"] = torch.cat([qb, torch.zeros_like(qb), vb])
        out[f"{to}.attn.c_proj.weight"] = keys.take(f"{src}.f_attn.f_c.w", (w, w))
        out[f"{to}.attn.c_proj.bias"] = keys.take(f"{src}.f_attn.f_c.b", (w,))
        out[f"{to}.ln_2.weight"] = keys.take(f"{src}.f_mlp.ln.g", (w,))
        out[f"{to}.ln_2.bias"] = keys.take(f"{src}.f_mlp.ln.b", (w,))
        out[f"{to}.mlp.c_fc.weight"] = keys.take(f"{src}.f_mlp.f_1.w", (4 * w, w))
        out[f"{to}.mlp.c_fc.bias"] = keys.take(f"{src}.f_mlp.f_1.b", (4 * w,))
        out[f"{to}.mlp.c_proj.weight"] = keys.take(f"{src}.f_mlp.f_2.w", (w, 4 * w))
        out[f"{to}.mlp.c_proj.bias"] = keys.take(f"{src}.f_mlp.f_2.b", (w,))


def convert_clip(c: dict[str, Any], image: Keys, text: Keys) -> dict[str, Tensor]:
    """GLIDE's noised CLIP (clip_image_enc.pt's ImageEncoder, clip_text_enc.pt's TextEncoder; ``c`` its config.yaml)
    -> genzoo ``CLIP`` state with the ``noised-vit`` image tower."""
    wi, wt, e = c["n_head_image"] * c["n_head_state_image"], c["n_head_text"] * c["n_head_state_text"], c["n_embd"]
    p, n = c["patch_size"], (c["image_size"] // c["patch_size"]) ** 2
    out = {
        "image_tower.patch.weight": image.take("blocks.input.patch_proj", (wi, 3, p, p)),
        "image_tower.time_embedding.weight": image.take("blocks.input.w_t", (c["n_timesteps"], wi)),
        "image_tower.positional_embedding": image.take("blocks.input.w_pos", (n + 1, wi)),
        "image_tower.ln_pre.weight": image.take("blocks.input.ln.g", (wi,)),
        "image_tower.ln_pre.bias": image.take("blocks.input.ln.b", (wi,)),
    }
    _clip_blocks(out, "image_tower.blocks", image, c["n_xf_blocks_image"], wi)
    out["image_tower.ln_post.weight"] = image.take("blocks.output.ln.g", (wi,))
    out["image_tower.ln_post.bias"] = image.take("blocks.output.ln.b", (wi,))
    out["image_tower.proj.weight"] = image.take("blocks.output.f.w", (e, wi))
    out["text.token_embedding.weight"] = text.take("blocks.input.w_voc", (c["n_vocab"], wt))
    out["text.positional_embedding"] = text.take("blocks.input.w_pos", (c["max_text_len"], wt))
    _clip_blocks(out, "text.blocks", text, c["n_xf_blocks_text"], wt)
    out["text.ln_final.weight"] = text.take("blocks.output.ln.g", (wt,))
    out["text.ln_final.bias"] = text.take("blocks.output.ln.b", (wt,))
    out["text_projection.weight"] = text.take("blocks.output.f.w", (e, wt))
    out["logit_scale"] = torch.tensor(math.log(c["logit_scale"]))  # a constant of config.yaml, not in the files
    return out


def clip_config(c: dict[str, Any]) -> dict[str, Any]:
    """genzoo ``clip`` spec fields for GLIDE's noised CLIP (config.yaml ``c``)."""
    return {
        "embed_dim": c["n_embd"],
        "noised": True,
        "init_temperature": 1 / c["logit_scale"],
        "image_tower": {
            "type": "noised-vit",
            "image_size": c["image_size"],
            "patch_size": c["patch_size"],
            "width": c["n_head_image"] * c["n_head_state_image"],
            "layers": c["n_xf_blocks_image"],
            "heads": c["n_head_image"],
            "timesteps": c["n_timesteps"],
        },
        "text_tower": {
            "layers": c["n_xf_blocks_text"],
            "heads": c["n_head_text"],
            "width": c["n_head_text"] * c["n_head_state_text"],
            "context": c["max_text_len"],
            "vocab_size": c["n_vocab"],
        },
    }
