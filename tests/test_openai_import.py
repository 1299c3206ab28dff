"""The openai plugin (docs/interop.md): `genzoo import` of improved-diffusion, guided-diffusion and GLIDE files.

No reference package installs here, so this file carries its own reference: OpenAI's modules written out from the
published constructors and forwards (guided_diffusion/unet.py ``UNetModel`` / ``EncoderUNetModel``,
improved_diffusion/unet.py, glide_text2im/unet.py, text2im_model.py and xf.py) as a key -> shape table and a
functional forward over a state dict. It builds random state dicts with the published key names and shapes for
small configurations, saves them with ``torch.save`` as OpenAI did, imports them, and asserts that every key is
consumed exactly once (the converter refuses leftovers and re-reads), that the converted genzoo modules compute
what the reference computes from the same state dict, and that the imported run samples (with classifier guidance
for ADM, classifier-free guidance for GLIDE). Equality with OpenAI's own code is verified only by running a
published checkpoint (docs/interop.md).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from genzoo import api
from genzoo.errors import CheckpointError, GenzooError

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------------------- the reference: OpenAI's modules
# A block is a list of layers, as OpenAI's TimestepEmbedSequential holds them; a layer is (kind, arguments).


def res(ch, out, down=False, up=False):
    return ("res", dict(ch=ch, out=out, down=down, up=up))


def openai_unet_blocks(o: dict) -> tuple[list, list, list]:
    """input_blocks, middle_block, output_blocks of UNetModel.__init__ for the constructor arguments ``o``."""
    mc, mult, attn = o["model_channels"], o["channel_mult"], o["attention_ds"]
    ch = mult[0] * mc
    inputs, chans, ds = [[("conv_in", dict(cin=o["in_channels"], out=ch))]], [ch], 1
    for level, m in enumerate(mult):
        for _ in range(o["num_res_blocks"]):
            layers = [res(ch, m * mc)]
            ch = m * mc
            if ds in attn:
                layers.append(("attn", dict(ch=ch)))
            inputs.append(layers)
            chans.append(ch)
        if level != len(mult) - 1:
            inputs.append([res(ch, ch, down=True) if o["resblock_updown"] else ("down", dict(ch=ch))])
            chans.append(ch)
            ds *= 2
    middle = [res(ch, ch), ("attn", dict(ch=ch)), res(ch, ch)]
    outputs = []
    for level, m in list(enumerate(mult))[::-1]:
        for i in range(o["num_res_blocks"] + 1):
            layers = [res(ch + chans.pop(), m * mc)]
            ch = m * mc
            if ds in attn:
                layers.append(("attn", dict(ch=ch)))
            if level and i == o["num_res_blocks"]:
                layers.append(res(ch, ch, up=True) if o["resblock_updown"] else ("up", dict(ch=ch)))
                ds //= 2
            outputs.append(layers)
    return inputs, middle, outputs


def layer_shapes(kind, a, o) -> dict[str, tuple]:
    emb = 4 * o["model_channels"]
    if kind == "conv_in":
        return {"weight": (a["out"], a["cin"], 3, 3), "bias": (a["out"],)}
    if kind in ("down", "up"):
        name = "op" if kind == "down" else "conv"
        return {f"{name}.weight": (a["ch"], a["ch"], 3, 3), f"{name}.bias": (a["ch"],)}
    if kind == "res":
        ch, out = a["ch"], a["out"]
        s = {
            "in_layers.0.weight": (ch,),
            "in_layers.0.bias": (ch,),
            "in_layers.2.weight": (out, ch, 3, 3),
            "in_layers.2.bias": (out,),
            "emb_layers.1.weight": ((2 if o["use_scale_shift_norm"] else 1) * out, emb),
            "emb_layers.1.bias": ((2 if o["use_scale_shift_norm"] else 1) * out,),
            "out_layers.0.weight": (out,),
            "out_layers.0.bias": (out,),
            "out_layers.3.weight": (out, out, 3, 3),
            "out_layers.3.bias": (out,),
        }
        if ch != out:
            s.update({"skip_connection.weight": (out, ch, 1, 1), "skip_connection.bias": (out,)})
        return s
    ch = a["ch"]  # AttentionBlock
    s = {
        "norm.weight": (ch,),
        "norm.bias": (ch,),
        "qkv.weight": (3 * ch, ch, 1),
        "qkv.bias": (3 * ch,),
        "proj_out.weight": (ch, ch, 1),
        "proj_out.bias": (ch,),
    }
    if o.get("encoder_channels"):
        s.update({"encoder_kv.weight": (2 * ch, o["encoder_channels"], 1), "encoder_kv.bias": (2 * ch,)})
    return s


def unet_shapes(o: dict) -> dict[str, tuple]:
    """Every key UNetModel (Text2ImUNet with ``text``) has for ``o``, with its shape."""
    mc, emb = o["model_channels"], 4 * o["model_channels"]
    shapes = {
        "time_embed.0.weight": (emb, mc),
        "time_embed.0.bias": (emb,),
        "time_embed.2.weight": (emb, emb),
        "time_embed.2.bias": (emb,),
    }
    if o.get("num_classes"):
        shapes["label_emb.weight"] = (o["num_classes"], emb)
    inputs, middle, outputs = openai_unet_blocks(o)
    for prefix, blocks in (("input_blocks", inputs), ("output_blocks", outputs)):
        for i, block in enumerate(blocks):
            for j, (kind, a) in enumerate(block):
                shapes.update({f"{prefix}.{i}.{j}.{k}": v for k, v in layer_shapes(kind, a, o).items()})
    for j, (kind, a) in enumerate(middle):
        shapes.update({f"middle_block.{j}.{k}": v for k, v in layer_shapes(kind, a, o).items()})
    ch = o["channel_mult"][0] * mc
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.weight": (o["out_channels"], ch, 3, 3)})
    shapes["out.2.bias"] = (o["out_channels"],)
    if o.get("text"):
        shapes.update(text_shapes(o["text"], emb))
    return shapes


def text_shapes(x: dict, emb: int) -> dict[str, tuple]:
    """Text2ImUNet's transformer keys (xf_width, xf_layers, text_ctx, xf_padding, xf_final_ln)."""
    w = x["width"]
    s = {
        "token_embedding.weight": (x["vocab"], w),
        "positional_embedding": (x["ctx"], w),
        "padding_embedding": (x["ctx"], w),
        "final_ln.weight": (w,),
        "final_ln.bias": (w,),
        "transformer_proj.weight": (emb, w),
        "transformer_proj.bias": (emb,),
    }
    for i in range(x["layers"]):
        p = f"transformer.resblocks.{i}"
        for name, shape in (
            ("attn.c_qkv", (3 * w, w)),
            ("attn.c_proj", (w, w)),
            ("mlp.c_fc", (4 * w, w)),
            ("mlp.c_proj", (w, 4 * w)),
        ):
            s[f"{p}.{name}.weight"], s[f"{p}.{name}.bias"] = shape, shape[:1]
        for ln in ("ln_1", "ln_2"):
            s[f"{p}.{ln}.weight"], s[f"{p}.{ln}.bias"] = (w,), (w,)
    return s


def classifier_shapes(o: dict) -> dict[str, tuple]:
    """EncoderUNetModel(pool='attention'): UNetModel's input and middle blocks, then out = [GroupNorm, SiLU,
    AttentionPool2d]."""
    shapes = {k: v for k, v in unet_shapes(o).items() if not k.startswith(("output_blocks", "out.", "label_emb"))}
    ch, side = o["channel_mult"][-1] * o["model_channels"], o["image_size"] // 2 ** (len(o["channel_mult"]) - 1)
    shapes.update({"out.0.weight": (ch,), "out.0.bias": (ch,), "out.2.positional_embedding": (ch, side * side + 1)})
    shapes.update({"out.2.qkv_proj.weight": (3 * ch, ch, 1), "out.2.qkv_proj.bias": (3 * ch,)})
    shapes.update({"out.2.c_proj.weight": (o["out_channels"], ch, 1), "out.2.c_proj.bias": (o["out_channels"],)})
    return shapes


def random_state(shapes: dict[str, tuple], seed: int) -> dict[str, torch.Tensor]:
    """Random weights, GroupNorm/LayerNorm gains near 1, nothing zero (OpenAI zero-initialises output layers)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, shape in shapes.items():
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        w = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        out[k] = 1 + 0.1 * w if len(shape) == 1 and k.endswith("weight") else (0.1 * w if len(shape) == 1 else w)
    return out


# ---------------------------------------------------------------------------- the reference forward


def gn(sd, p, x):  # GroupNorm32: 32 groups, in float32
    return F.group_norm(x.float(), 32, sd[f"{p}.weight"], sd[f"{p}.bias"], 1e-5)


def conv(sd, p, x, stride=1):
    w = sd[f"{p}.weight"]
    return (F.conv1d if w.dim() == 3 else F.conv2d)(x, w, sd[f"{p}.bias"], stride=stride, padding=w.shape[-1] // 2)


def openai_timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def qkv_attention(qkv, heads, new_order, encoder_kv=None):
    """QKVAttention (q/k/v split before heads) or QKVAttentionLegacy / GLIDE's QKVAttention (heads first)."""
    bs, width, length = qkv.shape
    ch = width // (3 * heads)
    if new_order:
        q, k, v = (z.reshape(bs * heads, ch, length) for z in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(bs * heads, ch * 3, length).split(ch, dim=1)
    if encoder_kv is not None:
        ek, ev = encoder_kv.reshape(bs * heads, ch * 2, -1).split(ch, dim=1)
        k, v = torch.cat([ek, k], dim=-1), torch.cat([ev, v], dim=-1)
    scale = 1 / math.sqrt(math.sqrt(ch))
    weight = torch.softmax(torch.einsum("bct,bcs->bts", q * scale, k * scale), dim=-1)
    return torch.einsum("bts,bcs->bct", weight, v).reshape(bs, -1, length)


def run_layer(sd, p, kind, a, h, emb, o, xf_out):
    if kind == "conv_in":
        return conv(sd, p, h)
    if kind == "down":
        return conv(sd, f"{p}.op", h, stride=2)
    if kind == "up":
        return conv(sd, f"{p}.conv", F.interpolate(h, scale_factor=2, mode="nearest"))
    if kind == "res":
        x = h
        h = F.silu(gn(sd, f"{p}.in_layers.0", h))
        if a["down"] or a["up"]:
            resize = (lambda z: F.avg_pool2d(z, 2)) if a["down"] else (lambda z: F.interpolate(z, scale_factor=2))
            h, x = resize(h), resize(x)
        h = conv(sd, f"{p}.in_layers.2", h)
        e = F.linear(F.silu(emb), sd[f"{p}.emb_layers.1.weight"], sd[f"{p}.emb_layers.1.bias"])[..., None, None]
        if o["use_scale_shift_norm"]:
            scale, shift = e.chunk(2, dim=1)
            h = F.silu(gn(sd, f"{p}.out_layers.0", h) * (1 + scale) + shift)
        else:
            h = F.silu(gn(sd, f"{p}.out_layers.0", h + e))
        h = conv(sd, f"{p}.out_layers.3", h)
        return (conv(sd, f"{p}.skip_connection", x) if a["ch"] != a["out"] else x) + h
    b, c, *spatial = h.shape  # AttentionBlock
    x = h.reshape(b, c, -1)
    heads = o["num_heads"] if o["num_head_channels"] == -1 else c // o["num_head_channels"]
    enc = conv(sd, f"{p}.encoder_kv", xf_out) if xf_out is not None else None
    out = qkv_attention(conv(sd, f"{p}.qkv", gn(sd, f"{p}.norm", x)), heads, o["new_order"], enc)
    return (x + conv(sd, f"{p}.proj_out", out)).reshape(b, c, *spatial)


def openai_text(sd, x, tokens, mask):
    """Text2ImUNet.get_text_emb with xf.Transformer (non-causal; heads split before q/k/v)."""
    h = sd["token_embedding.weight"][tokens] + sd["positional_embedding"][None]
    h = torch.where(mask[..., None], h, sd["padding_embedding"][None])
    w = x["width"]

    def ln(p, z):
        return F.layer_norm(z, (w,), sd[f"{p}.weight"], sd[f"{p}.bias"])

    def lin(p, z):
        return F.linear(z, sd[f"{p}.weight"], sd[f"{p}.bias"])

    for i in range(x["layers"]):
        p = f"transformer.resblocks.{i}"
        qkv = lin(f"{p}.attn.c_qkv", ln(f"{p}.ln_1", h))
        bs, n, _ = qkv.shape
        ch = w // x["heads"]
        q, k, v = torch.split(qkv.view(bs, n, x["heads"], -1), ch, dim=-1)
        s = 1 / math.sqrt(math.sqrt(ch))
        weight = torch.softmax(torch.einsum("bthc,bshc->bhts", q * s, k * s), dim=-1)
        h = h + lin(f"{p}.attn.c_proj", torch.einsum("bhts,bshc->bthc", weight, v).reshape(bs, n, -1))
        h = h + lin(f"{p}.mlp.c_proj", F.gelu(lin(f"{p}.mlp.c_fc", ln(f"{p}.ln_2", h))))
    h = ln("final_ln", h)
    return lin("transformer_proj", h[:, -1]), h.permute(0, 2, 1)


def openai_unet(sd, o, x, t, y=None, tokens=None, mask=None, low_res=None):
    """UNetModel.forward (Text2ImUNet.forward with ``tokens``; SuperResModel's with ``low_res``)."""
    if low_res is not None:
        x = torch.cat([x, F.interpolate(low_res, x.shape[-2:], mode="bilinear", align_corners=False)], dim=1)
    emb = openai_timestep_embedding(t * o.get("time_scale", 1.0), o["model_channels"])
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])), *time2(sd))
    xf_out = None
    if y is not None:
        emb = emb + sd["label_emb.weight"][y]
    if tokens is not None:
        xf_proj, xf_out = openai_text(sd, o["text"], tokens, mask)
        emb = emb + xf_proj
    inputs, middle, outputs = openai_unet_blocks(o)
    hs, h = [], x
    for i, block in enumerate(inputs):
        for j, (kind, a) in enumerate(block):
            h = run_layer(sd, f"input_blocks.{i}.{j}", kind, a, h, emb, o, xf_out)
        hs.append(h)
    for j, (kind, a) in enumerate(middle):
        h = run_layer(sd, f"middle_block.{j}", kind, a, h, emb, o, xf_out)
    for i, block in enumerate(outputs):
        h = torch.cat([h, hs.pop()], dim=1)
        for j, (kind, a) in enumerate(block):
            h = run_layer(sd, f"output_blocks.{i}.{j}", kind, a, h, emb, o, xf_out)
    return conv(sd, "out.2", F.silu(gn(sd, "out.0", h)))


def time2(sd):
    return sd["time_embed.2.weight"], sd["time_embed.2.bias"]


def openai_classifier(sd, o, x, t):
    """EncoderUNetModel.forward with pool='attention' (AttentionPool2d: QKVAttention, the new order)."""
    emb = openai_timestep_embedding(t, o["model_channels"])
    emb = F.linear(F.silu(F.linear(emb, sd["time_embed.0.weight"], sd["time_embed.0.bias"])), *time2(sd))
    inputs, middle, _ = openai_unet_blocks(o)
    h = x
    for i, block in enumerate(inputs):
        for j, (kind, a) in enumerate(block):
            h = run_layer(sd, f"input_blocks.{i}.{j}", kind, a, h, emb, o, None)
    for j, (kind, a) in enumerate(middle):
        h = run_layer(sd, f"middle_block.{j}", kind, a, h, emb, o, None)
    h = F.silu(gn(sd, "out.0", h)).flatten(2)
    h = torch.cat([h.mean(dim=-1, keepdim=True), h], dim=-1) + sd["out.2.positional_embedding"][None]
    h = qkv_attention(conv(sd, "out.2.qkv_proj", h), h.shape[1] // 64, True)
    return conv(sd, "out.2.c_proj", h)[:, :, 0]


def clip_shapes(c: dict, tower: str) -> dict[str, tuple]:
    """glide_text2im/clip/encoders.py ImageEncoder (``tower='image'``) or TextEncoder keys for config ``c``."""
    w, e = c["heads"] * c["head_state"], c["embd"]
    if tower == "image":
        n = (c["image_size"] // c["patch"]) ** 2
        s = {"blocks.input.patch_proj": (w, 3, c["patch"], c["patch"]), "blocks.input.w_t": (c["timesteps"], w)}
        s.update({"blocks.input.w_pos": (n + 1, w), "blocks.input.ln.g": (w,), "blocks.input.ln.b": (w,)})
    else:
        s = {"blocks.input.w_voc": (c["vocab"], w), "blocks.input.w_pos": (c["ctx"], w)}
    for i in range(c["layers"]):
        p = f"blocks.block_{i}"
        for name in ("f_attn.ln.g", "f_attn.ln.b", "f_mlp.ln.g", "f_mlp.ln.b", "f_attn.f_q.b", "f_attn.f_v.b"):
            s[f"{p}.{name}"] = (w,)
        for name in ("f_q", "f_k", "f_v", "f_c"):
            s[f"{p}.f_attn.{name}.w"] = (w, w)
        s[f"{p}.f_attn.f_c.b"] = (w,)
        s[f"{p}.f_mlp.f_1.w"], s[f"{p}.f_mlp.f_1.b"] = (4 * w, w), (4 * w,)
        s[f"{p}.f_mlp.f_2.w"], s[f"{p}.f_mlp.f_2.b"] = (w, 4 * w), (w,)
    s.update({"blocks.output.ln.g": (w,), "blocks.output.ln.b": (w,), "blocks.output.f.w": (e, w)})
    return s


def openai_clip_blocks(sd, h, c, causal):
    """TransformerBlock: AttentionResblock (q, k without bias, v; causal for text) then FullyConnectedResblock."""
    heads, d = c["heads"], c["head_state"]
    w = heads * d

    def ln(p, z):
        return F.layer_norm(z, (w,), sd[f"{p}.g"], sd[f"{p}.b"], 1e-5)

    for i in range(c["layers"]):
        p = f"blocks.block_{i}"
        r = ln(f"{p}.f_attn.ln", h)
        q = F.linear(r, sd[f"{p}.f_attn.f_q.w"], sd[f"{p}.f_attn.f_q.b"])
        k = F.linear(r, sd[f"{p}.f_attn.f_k.w"])
        v = F.linear(r, sd[f"{p}.f_attn.f_v.w"], sd[f"{p}.f_attn.f_v.b"])
        q, k, v = (z.view(z.shape[0], -1, heads, d).permute(0, 2, 1, 3) for z in (q, k, v))
        s = math.sqrt(1 / math.sqrt(d))
        weight = torch.einsum("bhcd,bhkd->bhck", q * s, k * s)
        if causal:
            n = weight.shape[-1]
            weight = weight + torch.triu(torch.full((n, n), -1e10), diagonal=1)
        r = torch.einsum("bhck,bhkd->bhcd", torch.softmax(weight, dim=-1), v).permute(0, 2, 1, 3).flatten(2)
        h = h + F.linear(r, sd[f"{p}.f_attn.f_c.w"], sd[f"{p}.f_attn.f_c.b"])
        r = ln(f"{p}.f_mlp.ln", h)
        h = h + F.linear(F.gelu(F.linear(r, sd[f"{p}.f_mlp.f_1.w"], sd[f"{p}.f_mlp.f_1.b"])), *f2(sd, p))
    return F.layer_norm(h, (w,), sd["blocks.output.ln.g"], sd["blocks.output.ln.b"], 1e-5)


def f2(sd, p):
    return sd[f"{p}.f_mlp.f_2.w"], sd[f"{p}.f_mlp.f_2.b"]


def openai_clip_image(sd, c, x, t):
    """ImageEncoder.forward: CLIP's normalisation of (x + 1) * 127.5, patches, the step's embedding first, ln."""
    mean = torch.tensor([122.77093945, 116.74601272, 104.09373519]).view(1, 3, 1, 1)
    std = torch.tensor([68.50053285, 66.63215831, 70.32316309]).view(1, 3, 1, 1)
    h = F.conv2d(((x + 1) * 127.5 - mean) / std, sd["blocks.input.patch_proj"], stride=c["patch"])
    h = torch.cat([sd["blocks.input.w_t"][t][:, None], h.flatten(2).permute(0, 2, 1)], dim=1) + sd["blocks.input.w_pos"]
    h = F.layer_norm(h, h.shape[-1:], sd["blocks.input.ln.g"], sd["blocks.input.ln.b"], 1e-5)
    return F.linear(openai_clip_blocks(sd, h, c, causal=False)[:, 0], sd["blocks.output.f.w"])


def openai_clip_text(sd, c, tokens, lengths):
    """TextEncoder.forward: causal blocks, the output at text_len - 1 (the end token), ln, f."""
    h = openai_clip_blocks(sd, sd["blocks.input.w_voc"][tokens] + sd["blocks.input.w_pos"], c, causal=True)
    return F.linear(h[torch.arange(len(tokens)), lengths - 1], sd["blocks.output.f.w"])


# ---------------------------------------------------------------------------- small configurations

ARCH = dict(in_channels=3, model_channels=32, num_res_blocks=1, use_scale_shift_norm=True, out_channels=6)
LEVELS = ("image_size", "channel_mult", "attention_ds", "num_heads", "num_head_channels")


def unet_arch(*levels, **kw) -> dict:
    """ARCH with the fields of LEVELS, in that order, then ``kw`` (resblock_updown, new_order, ...) over it."""
    return dict(ARCH, **dict(zip(LEVELS, levels, strict=True)), **kw)


GUIDED = dict(  # guided-diffusion's 64x64 layout, narrow: new attention order, resblock_updown, class-conditional
    flags="--image_size 64 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 32 "
    "--class_cond True --learn_sigma True --num_head_channels 16 --resblock_updown True "
    "--use_new_attention_order True --diffusion_steps 100 --noise_schedule cosine --timestep_respacing 5 "
    "--use_scale_shift_norm True",
    arch=unet_arch(64, (1, 2), (2,), 4, 16, resblock_updown=True, new_order=True, num_classes=1000),
)
IMPROVED = dict(  # improved-diffusion's CIFAR-10 layout, narrow: legacy order, conv resampling, 4000 rescaled steps
    flags="--image_size 32 --num_channels 32 --num_res_blocks 1 --learn_sigma True --diffusion_steps 4000 "
    "--noise_schedule cosine",
    arch=unet_arch(32, (1, 2, 2, 2), (2, 4), 4, -1, resblock_updown=False, new_order=False, time_scale=0.25),
)
TEXT = dict(width=32, layers=2, heads=2, ctx=8)
GLIDE = dict(  # GLIDE's base at 16x16 with a 2-layer, 32-wide text transformer over 8 tokens
    flags="--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
    "--num_head_channels 16 --text_ctx 8 --xf_width 32 --xf_layers 2 --xf_heads 2 --diffusion_steps 100 "
    "--timestep_respacing 4",
    arch=unet_arch(16, (1, 2), (2,), 1, 16, resblock_updown=True, new_order=False, encoder_channels=32),
)
CLASSIFIER = dict(  # create_classifier at 64x64 (channel_mult 1,2,3,4 from the size), width 32, depth 1
    flags="--image_size 64 --classifier_width 32 --classifier_depth 1 --classifier_attention_resolutions 16 "
    "--classifier_scale 3.0",
    arch=unet_arch(64, (1, 2, 3, 4), (4,), 1, 64, resblock_updown=True, new_order=False, out_channels=1000),
)
NOISED_CLIP = dict(  # GLIDE's noised CLIP (config.yaml's keys) at 16x16, 2 blocks of 2 heads each side
    flags="--image_size 16 --patch_size 4 --n_vocab 64 --max_text_len 8 --n_embd 24 --n_head_state_text 8 "
    "--n_head_text 2 --n_xf_blocks_text 2 --n_head_state_image 8 --n_head_image 2 --n_xf_blocks_image 2 "
    "--n_timesteps 100",
    arch=dict(image_size=16, patch=4, vocab=64, ctx=8, embd=24, head_state=8, heads=2, layers=2, timesteps=100),
)
# GPT-2 byte-level BPE files at toy size: the 256 byte symbols, three merges, then the end token
MERGES = [("c", "u"), ("cu", "b"), ("\u0120", "cub")]  # \u0120 is the byte symbol of the space (32 -> 256 + 32)


def write_bpe(folder):
    from genzoo_openai.glide import byte_symbols

    folder.mkdir()
    symbols = list(byte_symbols().values())
    vocab = {s: i for i, s in enumerate(symbols + [a + b for a, b in MERGES] + ["<|endoftext|>"])}
    (folder / "encoder.json").write_text(json.dumps(vocab))
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in MERGES))
    return folder, vocab


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Each model's random state dict, saved as OpenAI's scripts save one (torch.save of a state dict)."""
    d = tmp_path_factory.mktemp("openai")
    bpe, vocab = write_bpe(d / "bpe")
    GLIDE["arch"]["text"] = dict(TEXT, vocab=len(vocab))
    states = {
        "guided": random_state(unet_shapes(GUIDED["arch"]), 0),
        "improved": random_state(unet_shapes(IMPROVED["arch"]), 1),
        "glide": random_state(unet_shapes(GLIDE["arch"]), 2),
        "classifier": random_state(classifier_shapes(CLASSIFIER["arch"]), 3),
    }
    states["clip_image"] = random_state(clip_shapes(NOISED_CLIP["arch"], "image"), 4)
    states["clip_text"] = random_state(clip_shapes(NOISED_CLIP["arch"], "text"), 5)
    for name, state in states.items():
        torch.save(state, d / f"{name}.pt")
    return d, states, bpe, vocab


def close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ---------------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    "name, case, options",
    [("guided", GUIDED, {}), ("improved", IMPROVED, {"codebase": "improved-diffusion"})],
)
def test_every_key_is_consumed_once_and_the_unet_computes_what_openais_does(made, tmp_path, name, case, options):
    from genzoo_openai.convert import Keys, convert_unet
    from genzoo_openai.layouts import parse_flags, unet_layout

    d, states, _, _ = made
    codebase = options.get("codebase", "guided-diffusion")
    layout = unet_layout(codebase, parse_flags(case["flags"], codebase, where="t"), super_res=False, where="t")
    keys = Keys(states[name], "t")
    converted = convert_unet(layout, keys)
    keys.finish()
    assert keys.taken == set(states[name])  # every key, each once
    with pytest.raises(GenzooError, match="read twice"):
        keys.take("out.2.weight", tuple(states[name]["out.2.weight"].shape))
    assert len(converted) == len(states[name])  # one genzoo tensor per OpenAI tensor

    api.import_model(d / f"{name}.pt", tmp_path / "run", options={"flags": case["flags"], **options})
    net = api.load_model(tmp_path / "run").components["decoder"].denoiser.eval()
    arch, g = case["arch"], torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, arch["image_size"], arch["image_size"], generator=g), torch.tensor([3, 97])
    y = torch.tensor([5, 999]) if arch.get("num_classes") else None
    with torch.no_grad():
        ours = net(x, t, {"y": y} if y is not None else None)
        ref = openai_unet(states[name], arch, x, t, y=y)
    assert ours.shape == ref.shape == (2, 6, arch["image_size"], arch["image_size"])
    assert close(ours, ref), (ours - ref).abs().max()


def test_guided_model_with_its_classifier_samples_with_classifier_guidance(made, tmp_path, capsys, monkeypatch):
    from genzoo.cli import main

    d, states, _, _ = made
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    argv = ["import", str(d / "guided.pt"), str(tmp_path / "run"), "--classifier", str(d / "classifier.pt")]
    assert (
        main([*argv, "--option", f"flags={GUIDED['flags']}", "--option", f"classifier_flags={CLASSIFIER['flags']}"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "torch.load(weights_only=True)" in printed and "safetensors" in printed
    assert calls and all(w is True for w in calls)  # only ever with weights_only=True
    monkeypatch.setattr(torch, "load", real_load)

    pipe = api.load_model(tmp_path / "run")
    guidance = pipe.components["guidance"]
    assert guidance.scale == 3.0 and pipe.components["sampler"].cfg.steps == 5
    arch, g = CLASSIFIER["arch"], torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 64, 64, generator=g), torch.tensor([0, 77])
    with torch.no_grad():
        assert close(guidance.classifier.eval()(x, t), openai_classifier(states["classifier"], arch, x, t))
    y = {"y": torch.tensor([3, 900])}
    guided = pipe.sample(2, y, generator=torch.Generator().manual_seed(0))
    plain = api.load_model(tmp_path / "run", scale=0.0).sample(2, y, generator=torch.Generator().manual_seed(0))
    assert guided.shape == (2, 3, 64, 64) and torch.isfinite(guided).all()
    assert (guided - plain).abs().max() > 1e-4  # the classifier's gradient moved the samples
    # every other command still refuses the pickle
    with pytest.raises(CheckpointError, match="pickle"):
        api.load_model(d / "guided.pt")


def test_glide_base_computes_what_text2imunet_does_and_samples_from_a_prompt(made, tmp_path):
    from genzoo_openai.glide import GPT2BPE

    d, states, bpe, vocab = made
    options = {"flags": GLIDE["flags"], "tokenizer": str(bpe), "clip_flags": NOISED_CLIP["flags"]}
    options.update(clip_image=str(d / "clip_image.pt"), clip_text=str(d / "clip_text.pt"))
    api.import_model(d / "glide.pt", tmp_path / "run", options=options)
    pipe = api.load_model(tmp_path / "run")
    net, arch = pipe.components["decoder"].denoiser.eval(), GLIDE["arch"]
    end = len(vocab) - 1
    tokens = GPT2BPE(bpe).padded(["a cube", "cube cube cube"], 8)
    cube, space_cube = [vocab["cub"], vocab["e"]], [vocab["\u0120cub"], vocab["e"]]
    assert tokens[1].tolist() == cube + space_cube * 2 + [end] * 2  # GPT-2 BPE: lowest-rank merge first
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 16, 16, generator=g), torch.tensor([10, 60])
    with torch.no_grad():
        ours = net(x, t, {"glide_tokens": tokens})
        ref = openai_unet(states["glide"], arch, x, t, tokens=tokens, mask=tokens != end)
        assert close(ours, ref), (ours - ref).abs().max()
        # classifier-free guidance's null half is GLIDE's empty caption, every position padding
        null = net(x, t, {"glide_tokens": tokens, "drop": torch.tensor([True, False])})
        empty = torch.full_like(tokens, end)
        ref_null = openai_unet(states["glide"], arch, x, t, tokens=empty, mask=empty != end)
        assert close(null[0], ref_null[0]) and close(null[1], ref[1])
    images = pipe.sample(2, {"caption": ["a cube", "cube"]}, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert pipe.components["guidance"].scale == 3.0  # text2im.ipynb's guidance_scale

    # the noised CLIP: both towers compute what glide_text2im/clip computes, and guide a sampling run
    clip, c = pipe.components["clip"].eval(), NOISED_CLIP["arch"]
    clip_tokens = torch.tensor([[60, 5, 7, 63, 0, 0, 0, 0], [60, 1, 2, 3, 4, 5, 6, 63]])  # SOT ... EOT (largest id)
    with torch.no_grad():
        assert close(clip.image_tower(x, t), openai_clip_image(states["clip_image"], c, x, t))
        ref_text = F.normalize(openai_clip_text(states["clip_text"], c, clip_tokens, torch.tensor([4, 8])), dim=-1)
        assert close(clip.encode_tokens(clip_tokens), ref_text)
    assert clip.logit_scale.exp().item() == pytest.approx(100.0)
    guided = api.load_model(tmp_path / "run", guidance="clip", scale=50.0)
    cond = {"glide_tokens": tokens, "tokens": clip_tokens}
    parts = guided.components
    z = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = parts["decoder"].decode(z, cond, sampler=parts["sampler"], guidance=parts["guidance"])
        b = parts["decoder"].decode(z, cond, sampler=parts["sampler"], guidance=None)
    assert torch.isfinite(a).all() and (a - b).abs().max() > 1e-4


SUPER_RES = dict(  # sr_create_model at 64 px (channel_mult 1,2,3,4 from the size): 64_256_upsampler's flags, narrow
    flags="--large_size 64 --small_size 16 --num_channels 32 --num_res_blocks 1 --attention_resolutions 32 "
    "--class_cond True --learn_sigma True --num_heads 4 --resblock_updown True --use_scale_shift_norm True",
    arch=dict(GUIDED["arch"], in_channels=6, channel_mult=(1, 2, 3, 4), num_head_channels=-1, new_order=False),
)


BASE16 = dict(  # a class-conditional 16x16 base for SUPER_RES to follow (guided-diffusion's layout, narrow)
    flags="--image_size 16 --num_channels 32 --num_res_blocks 1 --channel_mult 1,2 --attention_resolutions 8 "
    "--class_cond True --learn_sigma True --num_head_channels 16 --resblock_updown True "
    "--use_new_attention_order True --diffusion_steps 100 --noise_schedule cosine --timestep_respacing 5 "
    "--use_scale_shift_norm True",
    arch=unet_arch(16, (1, 2), (2,), 4, 16, resblock_updown=True, new_order=True, num_classes=1000),
)
GLIDE_UP = dict(  # GLIDE's upsampler after GLIDE's 16x16 base: 16 -> 32, its own text transformer, fast27
    flags=GLIDE["flags"]
    .replace("--image_size 16", "--image_size 32")
    .replace("--attention_resolutions 8", "--attention_resolutions 16")
    .replace("--timestep_respacing 4", "--timestep_respacing fast27"),
    arch=unet_arch(32, (1, 2), (2,), 1, 16, resblock_updown=True, new_order=False, encoder_channels=32, in_channels=6),
)


def test_a_class_base_and_its_upsampler_import_as_one_cascade_that_reads_the_class(made, tmp_path):
    """`--option upsampler=`: guided-diffusion's SuperResModel after its base, both class-conditional; the upsampler
    computes what SuperResModel does and reads each image's class."""
    d = made[0]
    up_state = random_state(unet_shapes(SUPER_RES["arch"]), 8)
    torch.save(random_state(unet_shapes(BASE16["arch"]), 7), d / "base16.pt")
    torch.save(up_state, d / "up64.pt")
    options = {"flags": BASE16["flags"], "upsampler": str(d / "up64.pt")}
    options["upsampler_flags"] = SUPER_RES["flags"] + " --diffusion_steps 100 --timestep_respacing 4"
    api.import_model(d / "base16.pt", tmp_path / "run", options=options)
    pipe = api.load_model(tmp_path / "run")
    assert pipe.upsampler_condition and pipe.base_size == 16 and tuple(pipe.upsampler.produces.shape) == (3, 64, 64)
    assert pipe.quantize_low_res  # super_res_sample.py reads the base's samples as saved 8-bit images
    g = torch.Generator().manual_seed(4)
    x, low, t, y = (
        torch.randn(2, 3, 64, 64, generator=g),
        torch.randn(2, 3, 16, 16, generator=g),
        torch.tensor([1, 99]),
        torch.tensor([0, 999]),
    )
    with torch.no_grad():
        ours = pipe.upsampler.denoiser.eval()(x, t, {"y": y, "low_res": low})
        assert close(ours, openai_unet(up_state, SUPER_RES["arch"], x, t, y=y, low_res=low))
    low = low[:1].expand(2, -1, -1, -1)
    a = pipe.upsample(low, {"y": torch.tensor([5, 5])}, generator=torch.Generator().manual_seed(0))
    b = pipe.upsample(low, {"y": torch.tensor([5, 900])}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-4  # the class reached the upsampler
    images = pipe.sample(2, {"y": torch.tensor([3, 7])}, generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    with pytest.raises(GenzooError, match=r"is a super-resolution model .* --option upsampler="):
        api.import_model(d / "up64.pt", tmp_path / "alone", options={"flags": options["upsampler_flags"]})
    unflagged = {k: v for k, v in options.items() if k != "upsampler_flags"}
    with pytest.raises(GenzooError, match=r"up64.pt: its layout is none of .*64_256_upsampler.pt.* upsampler_flags="):
        api.import_model(d / "base16.pt", tmp_path / "unflagged", options=unflagged)
    with pytest.raises(GenzooError, match="upsampler base16.pt is not a super-resolution model"):
        api.import_model(d / "base16.pt", tmp_path / "twice", options={**options, "upsampler": str(d / "base16.pt")})


def test_glides_base_and_upsampler_import_as_one_cascade_that_reads_the_caption(made, tmp_path):
    """GLIDE's upsample.pt after base.pt: its own text transformer reads the caption's tokens, on glide-text2im's
    fast27 grid; a class or unconditional base refuses it."""
    from genzoo_openai.glide import GPT2BPE

    d, _, bpe, vocab = made
    arch = dict(GLIDE_UP["arch"], text=GLIDE["arch"]["text"])
    up_state = random_state(unet_shapes(arch), 9)
    torch.save(up_state, d / "glide_up.pt")
    options = {"flags": GLIDE["flags"], "tokenizer": str(bpe), "upsampler": str(d / "glide_up.pt")}
    api.import_model(d / "glide.pt", tmp_path / "run", options={**options, "upsampler_flags": GLIDE_UP["flags"]})
    pipe = api.load_model(tmp_path / "run")
    sampler = pipe.components["upsampler_sampler"]
    assert pipe.upsampler_condition and sampler.cfg.steps == "fast27" and sampler.nfe() == 27
    end, g = len(vocab) - 1, torch.Generator().manual_seed(5)
    tokens = GPT2BPE(bpe).padded(["a cube", "cube cube cube"], 8)
    x, low, t = torch.randn(2, 3, 32, 32, generator=g), torch.randn(2, 3, 16, 16, generator=g), torch.tensor([2, 98])
    with torch.no_grad():
        ours = pipe.upsampler.denoiser.eval()(x, t, {"glide_tokens": tokens, "low_res": low})
        assert close(ours, openai_unet(up_state, arch, x, t, tokens=tokens, mask=tokens != end, low_res=low))
    low = low[:1].expand(2, -1, -1, -1)
    a = pipe.upsample(low, {"caption": ["a cube", "a cube"]}, generator=torch.Generator().manual_seed(0))
    b = pipe.upsample(low, {"caption": ["a cube", "cube cube cube"]}, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() > 1e-4  # the caption reached the upsampler
    images = pipe.sample(2, {"caption": ["a cube", "cube"]}, generator=torch.Generator().manual_seed(1))
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(images).all()
    torch.save(random_state(unet_shapes(BASE16["arch"]), 7), d / "base16b.pt")
    with pytest.raises(GenzooError, match="upsampler glide_up.pt reads the caption but the base does not"):
        api.import_model(d / "base16b.pt", tmp_path / "mixed", options={**options, "flags": BASE16["flags"]})


@pytest.mark.parametrize("codebase", ["guided-diffusion", "glide-text2im"])
def test_super_resolution_layouts_convert_exactly(made, codebase):
    """SuperResModel (class-conditional, 64_256_upsampler's layout) and SuperResText2ImUNet (GLIDE's upsample.pt):
    the first conv also takes the upsampled low-resolution image. Converted into genzoo's modules directly (the
    cascade tests above import them behind a base)."""
    from dataclasses import replace

    from genzoo_openai.convert import Keys, convert_unet, unet_config
    from genzoo_openai.glide import GlideUNetConfig, build_glide_unet
    from genzoo_openai.importer import glide_denoiser
    from genzoo_openai.layouts import DEFAULTS, GLIDE_UPSAMPLER, parse_flags, unet_layout

    from genzoo.checkpoint import load_state_into
    from genzoo.nn.unet import UNet, UNetConfig

    vocab = made[3]
    glide = codebase == "glide-text2im"
    case = GLIDE if glide else SUPER_RES
    arch = dict(case["arch"], in_channels=6)
    base = {**DEFAULTS[codebase], **GLIDE_UPSAMPLER} if glide else None
    state = random_state(unet_shapes(arch), 6)
    layout = unet_layout(
        codebase, parse_flags(case["flags"], codebase, where="t", base=base), super_res=True, where="t"
    )
    keys = Keys(state, "t")
    converted, fields = convert_unet(layout, keys), unet_config(layout, 1.0)
    if glide:
        layout = replace(layout, text=replace(layout.text, n_vocab=len(vocab)))
        spec, converted = glide_denoiser(layout, keys, converted, 1.0)
        net = build_glide_unet(GlideUNetConfig(**{k: v for k, v in spec.items() if k != "type"}))
    else:
        net = UNet(UNetConfig(**fields))
    keys.finish()
    load_state_into(net, converted, role="decoder.denoiser", where="t")
    size, g = layout.image_size, torch.Generator().manual_seed(3)
    x, low = torch.randn(2, 3, size, size, generator=g), torch.randn(2, 3, size // 4, size // 4, generator=g)
    t, end = torch.tensor([1, 99]), len(vocab) - 1
    tokens = torch.full((2, 8), end).index_fill_(1, torch.tensor([0, 1]), vocab["cub"])
    with torch.no_grad():
        if glide:
            ours = net.eval()(x, t, {"glide_tokens": tokens, "low_res": low})
            ref = openai_unet(state, arch, x, t, tokens=tokens, mask=tokens != end, low_res=low)
        else:
            y = torch.tensor([0, 999])
            ours, ref = net.eval()(x, t, {"y": y, "low_res": low}), openai_unet(state, arch, x, t, y=y, low_res=low)
    assert ours.shape == (2, 6, size, size) and close(ours, ref), (ours - ref).abs().max()


def test_an_adaptive_pool_classifier_converts_exactly():
    """EncoderUNetModel(pool='adaptive'): out = [GroupNorm, SiLU, AdaptiveAvgPool2d, zero 1x1 conv, Flatten]."""
    from genzoo_openai.convert import Keys, classifier_config, convert_classifier
    from genzoo_openai.layouts import classifier_layout, parse_flags

    from genzoo.nn.classifier import NoisyClassifier, NoisyClassifierConfig

    arch = CLASSIFIER["arch"]
    shapes = {k: v for k, v in classifier_shapes(arch).items() if not k.startswith("out.2")}
    shapes.update({"out.3.weight": (1000, 128, 1, 1), "out.3.bias": (1000,)})
    state = random_state(shapes, 7)
    flags = CLASSIFIER["flags"] + " --classifier_pool adaptive"
    layout = classifier_layout(parse_flags(flags, "guided-diffusion", where="t"), where="t")
    keys = Keys(state, "t")
    net = NoisyClassifier(NoisyClassifierConfig(**classifier_config(layout)))
    net.load_state_dict(convert_classifier(layout, keys))
    keys.finish()
    x, t = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)), torch.tensor([5, 900])
    emb = openai_timestep_embedding(t, 32)
    emb = F.linear(F.silu(F.linear(emb, state["time_embed.0.weight"], state["time_embed.0.bias"])), *time2(state))
    inputs, middle, _ = openai_unet_blocks(arch)
    h = x
    for prefix, blocks in [(f"input_blocks.{i}", b) for i, b in enumerate(inputs)] + [("middle_block", middle)]:
        for j, (kind, a) in enumerate(blocks):
            h = run_layer(state, f"{prefix}.{j}", kind, a, h, emb, arch, None)
    ref = conv(state, "out.3", F.silu(gn(state, "out.0", h)).mean(dim=(2, 3), keepdim=True)).flatten(1)
    with torch.no_grad():
        assert close(net.eval()(x, t), ref)


def test_a_layout_the_flags_do_not_describe_is_refused_naming_the_key(made, tmp_path):
    d, states, _, _ = made
    wrong = GUIDED["flags"].replace("--num_channels 32", "--num_channels 64")
    with pytest.raises(GenzooError, match=r"key time_embed.0.weight has shape \(128, 32\) but the flags give"):
        api.import_model(d / "guided.pt", tmp_path / "a", options={"flags": wrong})
    torch.save({**states["guided"], "extra.weight": torch.zeros(1)}, tmp_path / "more.pt")
    with pytest.raises(GenzooError, match=r"1 key\(s\) genzoo's layout has no place for, e.g. extra.weight"):
        api.import_model(tmp_path / "more.pt", tmp_path / "b", options={"flags": GUIDED["flags"]})
    big = GUIDED["flags"].replace("--image_size 64", "--image_size 512").replace("--channel_mult 1,2 ", "")
    with pytest.raises(GenzooError, match=r"channel_mult \(0.5, 1, 1, 2, 2, 4, 4\)"):
        api.import_model(d / "guided.pt", tmp_path / "c", options={"flags": big})
    with pytest.raises(GenzooError, match="noisy classifier .*--classifier"):
        api.import_model(d / "classifier.pt", tmp_path / "d")
    with pytest.raises(GenzooError, match="none of OpenAI's published checkpoints.*--option flags="):
        api.import_model(d / "guided.pt", tmp_path / "e")
    with pytest.raises(GenzooError, match="is not a flag of guided-diffusion's scripts"):
        api.import_model(d / "guided.pt", tmp_path / "f", options={"flags": "--num_chanels 32"})
    assert not any((tmp_path / n).exists() for n in "abcdef")


def test_a_file_with_a_published_layout_needs_no_flags(made, tmp_path, monkeypatch):
    import genzoo_openai.importer as importer
    from genzoo_openai.layouts import Published

    d, _, _, _ = made
    entry = Published("tiny_guided.pt", "guided-diffusion", "model", GUIDED["flags"], "here", "FID 1.0 (test)")
    monkeypatch.setattr(importer, "PUBLISHED", (entry,))
    monkeypatch.setattr(importer, "published", lambda name: entry if name == entry.name else None)
    path = api.import_model(d / "guided.pt", tmp_path / "run")
    meta = json.loads((path / "meta.json").read_text())["imported_from"]
    assert meta["flags_from"] == "tiny_guided.pt" and meta["codebase"] == "guided-diffusion"
    twin = Published("twin.pt", "guided-diffusion", "model", GUIDED["flags"].replace("cosine", "linear"), "here")
    monkeypatch.setattr(importer, "PUBLISHED", (entry, twin))
    with pytest.raises(GenzooError, match="has the layout of tiny_guided.pt and of twin.pt, which sample differently"):
        api.import_model(d / "guided.pt", tmp_path / "other")
