"""Pixel-level guidance: ILVR, Iterative Latent Variable Refinement (Choi et al. 2021, Alg. 1).

After every reverse step, x'_{t-1} ~ p(x_{t-1} | x_t) keeps its high frequencies and takes the reference's low
ones: x_{t-1} = phi_N(y_{t-1}) + x'_{t-1} - phi_N(x'_{t-1}), with y_{t-1} ~ q(y_{t-1} | y) the reference noised to
the same level and phi_N the low-pass filter of factor N. Samples then share the reference's coarse layout and
colours and vary in what the low-pass does not see.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.samplers import randn
from genzoo.errors import GenzooError
from genzoo.interfaces import Condition
from genzoo.registry import component

from .reference import Reference, ReferenceConfig


class PixelGuidanceConfig(ReferenceConfig):
    factor: int = Field(
        4,
        ge=1,
        description="N: the low-pass phi_N averages N x N blocks (and repeats them back); it must divide the side",
    )
    stop: int = Field(
        0,
        ge=0,
        description="ILVR's conditioning range [stop, T]: refine the states whose original timestep t is >= stop "
        "(x_0 is t = 0); 0 refines down to x_0, whose low-pass is then exactly the reference's",
    )
    seed: int = Field(0, description="seeds the noise of y_{t-1} ~ q(y_{t-1} | y) (draws per step, one per sample)")


def low_pass(x: Tensor, factor: int) -> Tensor:
    """phi_N(x): each N x N block replaced by its mean (area downsampling, then nearest upsampling).

    The orthogonal projection onto block-constant images, so phi_N(phi_N(x)) = phi_N(x) and the refinement sets the
    low-pass to the reference's exactly; ILVR's code resizes with bicubic filters, which is not a projection.
    """
    if factor == 1:
        return x
    if x.shape[-1] % factor or x.shape[-2] % factor:
        raise GenzooError(
            f"guidance 'pixel': field 'factor': {factor} does not divide the image side {tuple(x.shape[-2:])}; "
            "pick a divisor (e.g. 2, 4, 8)"
        )
    return F.interpolate(F.avg_pool2d(x, factor), scale_factor=factor, mode="nearest")


class PixelGuidance(DiffusionGuidance):
    """ILVR (Choi et al. 2021, Alg. 1) as a projection after each step; the model's prediction is left unguided."""

    def __init__(self, cfg: PixelGuidanceConfig, reference: Reference) -> None:
        self.factor, self.stop, self.seed, self.reference = cfg.factor, cfg.stop, cfg.seed, reference

    def after_step(self, diffusion: GaussianDiffusion, x: Tensor, i: int, cond: Condition | None) -> Tensor:
        t = 0 if i < 0 else int(diffusion.timestep_map[i]) + 1  # the original timestep of x (x_0: 0)
        if t < self.stop:
            return x
        y = self.reference.like(x, cond)
        if i >= 0:  # y_{t-1} ~ q(y_{t-1} | y); the sampler's generator does not reach this hook, so a seeded own one
            g = torch.Generator(device=x.device).manual_seed(self.seed * 1_000_003 + i)
            idx = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            y = diffusion.q_sample(y, idx, randn(x.shape, x, generator=g))
        return x - low_pass(x, self.factor) + low_pass(y, self.factor)


@component("guidance", "pixel", config=PixelGuidanceConfig)
def make_pixel_guidance(cfg: PixelGuidanceConfig, ctx) -> PixelGuidance:
    """ILVR (Choi et al. 2021): every step takes the low-pass of a reference image, noised to its level."""
    return PixelGuidance(cfg, Reference(cfg.reference, name="pixel", data=getattr(ctx, "data", None)))
