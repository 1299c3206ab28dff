"""What a leaderboard row says about a model's network (docs/interop.md, "Peers"): its implementation, the plugin and
component that provide it (``core: unet`` is genzoo's U-Net, ``diffusers: diffusers-unet2d`` diffusers'
UNet2DModel), and the GFLOP of one forward of it on one sample, counted by ``torch.utils.flop_counter``.

The network is the decoder's ``denoiser`` (a diffusion decoder's, or the one inside a latent-diffusion decoder); a
decoder without one (a GAN generator, a VAE decoder) is its own network and has no per-forward figure here (its one
forward is a whole sample).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from genzoo.nn.unet import flop_counter
from genzoo.registry import registered_name


def denoiser_of(decoder: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(the denoiser, the diffusion decoder that owns it), or None."""
    for name, module in decoder.named_modules():
        if name.rpartition(".")[2] == "denoiser":
            owner = name.rpartition(".")[0]
            return module, decoder.get_submodule(owner) if owner else decoder
    return None


def implementation(module: nn.Module, registry: Any) -> str:
    """``PLUGIN: NAME`` of the registered component ``module`` was built as."""
    name = registered_name(module)
    for kind in ("network", "decoder"):
        if name in registry.get_kind(kind):
            return f"{registry.get(kind, name).plugin}: {name}"
    return name


def gflop_per_forward(net: nn.Module, owner: nn.Module) -> float:
    """GFLOP of ``net(x_t, t, {})`` on one sample of ``owner``'s shape (nan when it needs a condition)."""
    param = next(net.parameters(), None)
    device, dtype = (param.device, param.dtype) if param is not None else ("cpu", torch.float32)
    x = torch.zeros(1, *owner.consumes.shape, device=device, dtype=dtype)
    t = torch.zeros(1, dtype=torch.long, device=device)
    try:
        with torch.no_grad(), flop_counter() as counter:
            net(x, t, {})
    except Exception:  # a conditional network without its condition: no figure, not a failed row
        return math.nan
    return counter.get_total_flops() / 1e9


def describe_network(model: Any, registry: Any) -> tuple[str, float]:
    """(implementation, GFLOP per forward) of ``model``'s decoder network."""
    decoder = model.components.get("decoder")
    if decoder is None:
        return "", math.nan
    found = denoiser_of(decoder)
    if found is None:
        return implementation(decoder, registry), math.nan
    net, owner = found
    return implementation(net, registry), gflop_per_forward(net, owner)
