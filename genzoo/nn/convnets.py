"""Convolutional encoders and decoders for the one-shot families (DCGAN, AE, VAE) and the VQ-VAE.

* :class:`ConvEncoder` maps an image to a vector: strided 4x4 convolutions halve the side down to
  4x4, then one linear layer. It is DCGAN's discriminator (Radford et al. 2016, Sec. 3: no norm
  on the input block, LeakyReLU 0.2) and the AE/VAE encoder.
* :class:`ConvDecoder` maps a vector to an image: one linear layer to 4x4, then 4x4 transposed
  convolutions doubling the side. It is DCGAN's generator (BatchNorm except the output, ReLU,
  tanh output) and the AE/VAE decoder.
* :class:`GridEncoder` / :class:`GridDecoder` keep a spatial grid (VQ-VAE, van den Oord et al.
  2017, Sec. 4.1: two stride-2 convolutions, residual blocks, then the mirror image).

Sizes (channels, side) default to the dataset's; the side must be a power of two >= 4.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import RegistryError
from genzoo.registry import component, spec_field

Norm = Literal["batch", "group", "none"]


def _norm(kind: Norm, ch: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(ch)
    if kind == "group":
        return nn.GroupNorm(min(32, ch // 4) or 1, ch)
    return nn.Identity()


def _levels(image_size: int) -> int:
    n = int(math.log2(image_size)) - 2
    if image_size < 4 or 2 ** (n + 2) != image_size:
        raise ValueError(f"conv networks need a power-of-two image side >= 4, got {image_size}")
    return n


def dcgan_init(module: nn.Module) -> None:
    """N(0, 0.02) weights and N(1, 0.02) norm scales (DCGAN Sec. 4)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class ConvNetConfig(BaseModel):
    """Fields shared by :class:`ConvEncoder` and :class:`ConvDecoder` (the owning component sets the sizes)."""

    model_config = ConfigDict(extra="forbid")
    channels: int = Field(64, ge=4, description="width at the full-resolution end; doubles at each halving")
    max_channels: int = Field(512, ge=4, description="cap on the width")
    norm: Norm = Field("batch", description="batch (DCGAN), group or none")
    dim: int | None = Field(
        None, description="vector size: the encoder's output / the decoder's input (set by the component)"
    )
    num_classes: int | None = Field(
        None, description="class-conditional when set: an embedding (decoder) or a projection (encoder)"
    )
    image_channels: int | None = Field(None, description="image channels; None takes the dataset's")
    image_size: int | None = Field(None, description="image side; None takes the dataset's")


def _widths(cfg: ConvNetConfig, n: int) -> list[int]:
    """Widths at sides S, S/2, ..., 4 (n + 1 entries)."""
    return [min(cfg.channels * 2**i, cfg.max_channels) for i in range(n + 1)]


@component("network", "conv-encoder", config=ConvNetConfig)
class ConvEncoder(nn.Module):
    """A DCGAN-style encoder: an image through strided convolutions to a vector.

    ``forward(x, y=None) -> (B, dim)``; with classes, adds ``<embed(y), h>`` (Miyato & Koyama 2018)."""

    def __init__(self, cfg: ConvNetConfig, ctx: Any = None) -> None:
        super().__init__()
        cfg = _sized(cfg, ctx)
        n = _levels(cfg.image_size)
        w = _widths(cfg, n)
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channels, w[0], 3, padding=1), nn.LeakyReLU(0.2)]
        for i in range(n):  # the input block has no norm (DCGAN Sec. 3)
            layers += [
                nn.Conv2d(w[i], w[i + 1], 4, stride=2, padding=1, bias=cfg.norm == "none"),
                _norm(cfg.norm, w[i + 1]),
                nn.LeakyReLU(0.2),
            ]
        self.features = nn.Sequential(*layers, nn.Flatten())
        self.out = nn.Linear(w[n] * 16, cfg.dim)
        self.embed = nn.Embedding(cfg.num_classes, w[n] * 16) if cfg.num_classes else None
        self.apply(dcgan_init)

    def forward(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        h = self.features(x)
        out = self.out(h)
        if self.embed is not None and y is not None:
            out = out + (self.embed(y) * h).sum(1, keepdim=True)
        return out


@component("network", "conv-decoder", config=ConvNetConfig)
class ConvDecoder(nn.Module):
    """A DCGAN-style decoder: a vector through transposed convolutions to an image.

    ``forward(z, y=None) -> (B, C, S, S)`` in [-1, 1] (tanh); with classes, ``[z; embed(y)]`` is the input."""

    def __init__(self, cfg: ConvNetConfig, ctx: Any = None) -> None:
        super().__init__()
        cfg = _sized(cfg, ctx)
        n = _levels(cfg.image_size)
        w = _widths(cfg, n)
        self.embed = nn.Embedding(cfg.num_classes, cfg.dim) if cfg.num_classes else None
        self.w4 = w[n]
        self.project = nn.Sequential(nn.Linear(cfg.dim * (2 if self.embed is not None else 1), w[n] * 16))
        self.norm0 = _norm(cfg.norm, w[n])
        layers: list[nn.Module] = [nn.ReLU()]
        for i in reversed(range(n)):
            layers += [
                nn.ConvTranspose2d(w[i + 1], w[i], 4, stride=2, padding=1, bias=cfg.norm == "none"),
                _norm(cfg.norm, w[i]),
                nn.ReLU(),
            ]
        layers += [nn.Conv2d(w[0], cfg.image_channels, 3, padding=1), nn.Tanh()]  # no norm on the output (DCGAN Sec. 3)
        self.body = nn.Sequential(*layers)
        self.apply(dcgan_init)

    def forward(self, z: Tensor, y: Tensor | None = None) -> Tensor:
        if self.embed is not None:
            if y is None:
                raise ValueError("this decoder is class-conditional; pass the class y")
            z = torch.cat([z, self.embed(y)], dim=1)
        h = self.project(z).view(z.shape[0], self.w4, 4, 4)
        return self.body(self.norm0(h))


def _sized(cfg: ConvNetConfig, ctx: Any) -> ConvNetConfig:
    data = getattr(ctx, "data", None)
    if data is not None:
        c, h, _ = data.image_shape
        cfg = cfg.model_copy(update={"image_channels": cfg.image_channels or c, "image_size": cfg.image_size or h})
    missing = [k for k in ("dim", "image_channels", "image_size") if getattr(cfg, k) is None]
    if missing:
        raise ValueError(f"conv network: {missing} must be set (the owning component or the dataset sets them)")
    return cfg


# --------------------------------------------------------------------------- spatial (VQ-VAE)


class GridNetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    channels: int = Field(64, ge=4, description="hidden width")
    num_res_blocks: int = Field(2, ge=0, description="residual blocks at the grid resolution")
    downsample: int | None = Field(None, description="image side / grid side: 2, 4 or 8 (set by the component)")
    dim: int | None = Field(None, description="channels of the grid (the code dimension; set by the component)")
    image_channels: int | None = Field(None, description="image channels; None takes the dataset's")


class _Res(nn.Module):
    """ReLU-conv3x3-ReLU-conv1x1 residual block (VQ-VAE Sec. 4.1)."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(ch, ch, 3, padding=1), nn.ReLU(), nn.Conv2d(ch, ch, 1))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def _halvings(downsample: int) -> int:
    if downsample not in (2, 4, 8):
        raise ValueError(f"GridNetConfig: downsample must be 2, 4 or 8, got {downsample}")
    return int(math.log2(downsample))


@component("network", "grid-encoder", config=GridNetConfig)
class GridEncoder(nn.Module):
    """An image to a grid of vectors (VQ-VAE encoder: downsampling, then residual blocks).

    ``(B, C, S, S) -> (B, dim, S/f, S/f)``."""

    def __init__(self, cfg: GridNetConfig, ctx: Any = None) -> None:
        super().__init__()
        cfg = _grid_sized(cfg, ctx)
        ch, layers, c_in = cfg.channels, [], cfg.image_channels
        for _ in range(_halvings(cfg.downsample)):
            layers += [nn.Conv2d(c_in, ch, 4, stride=2, padding=1), nn.ReLU()]
            c_in = ch
        layers += [nn.Conv2d(ch, ch, 3, padding=1)] + [_Res(ch) for _ in range(cfg.num_res_blocks)]
        layers += [nn.ReLU(), nn.Conv2d(ch, cfg.dim, 1)]
        self.body = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x)


@component("network", "grid-decoder", config=GridNetConfig)
class GridDecoder(nn.Module):
    """A grid of vectors to an image (VQ-VAE decoder: residual blocks, then upsampling).

    ``(B, dim, S/f, S/f) -> (B, C, S, S)``; linear output (the reconstruction loss is MSE)."""

    def __init__(self, cfg: GridNetConfig, ctx: Any = None) -> None:
        super().__init__()
        cfg = _grid_sized(cfg, ctx)
        ch = cfg.channels
        layers: list[nn.Module] = [nn.Conv2d(cfg.dim, ch, 3, padding=1)] + [_Res(ch) for _ in range(cfg.num_res_blocks)]
        n = _halvings(cfg.downsample)
        for i in range(n):
            out = cfg.image_channels if i == n - 1 else ch
            layers += [nn.ReLU(), nn.ConvTranspose2d(ch, out, 4, stride=2, padding=1)]
        self.body = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.body(z)


class CodeGridConfig(BaseModel):
    """What the discrete autoencoders share (VQ-VAE, DALL·E's dVAE): K codes of dimension D on a grid of side
    image side / downsample, and the encoder and decoder networks sized from them."""

    codebook_size: int = Field(128, ge=2, description="number of codes K (DALL·E's dVAE: 8192)")
    code_dim: int = Field(32, ge=1, description="dimension D of each code vector (or code embedding)")
    downsample: int = Field(4, description="image side / code-grid side: 2, 4 or 8 (DALL·E's dVAE: 8)")
    encoder: dict[str, Any] = spec_field("network", {"type": "grid-encoder"}, "image -> grid network")
    decoder: dict[str, Any] = spec_field("network", {"type": "grid-decoder"}, "code grid -> image network")


def grid_networks(cfg: CodeGridConfig, ctx: Any, where: str, encoder_dim: int) -> tuple[tuple[int, int], Any, Any]:
    """The (h, w) grid of codes over the dataset's images, and the encoder (to ``encoder_dim`` channels) and
    decoder (from ``code_dim``) networks built at ``cfg.downsample``, which a network's own must not contradict."""
    if ctx.data is None:
        raise RegistryError(f"{where} needs a dataset to size its networks")
    _, h, w = ctx.data.image_shape
    if h % cfg.downsample or w % cfg.downsample:
        raise RegistryError(f"{where}: field 'downsample' ({cfg.downsample}) must divide the image side {h}")
    nets = []
    for role, dim in (("encoder", encoder_dim), ("decoder", cfg.code_dim)):
        spec = dict(getattr(cfg, role))
        if spec.get("downsample") not in (None, cfg.downsample):
            raise RegistryError(
                f"{where}: {role}.downsample is {spec['downsample']} but downsample is {cfg.downsample}; "
                "set only the decoder's downsample"
            )
        spec.update(dim=dim, downsample=cfg.downsample)
        nets.append(ctx.registry.build("network", spec, data=ctx.data, where=f"{where}: {role}: "))
    return (h // cfg.downsample, w // cfg.downsample), *nets


def _grid_sized(cfg: GridNetConfig, ctx: Any) -> GridNetConfig:
    data = getattr(ctx, "data", None)
    if data is not None and cfg.image_channels is None:
        cfg = cfg.model_copy(update={"image_channels": data.image_shape[0]})
    if cfg.dim is None or cfg.image_channels is None:
        raise ValueError(
            "grid network: dim and image_channels must be set (the owning component or the dataset sets them)"
        )
    return cfg
