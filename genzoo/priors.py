"""Simple priors shared by several families."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.interfaces import Condition, Prior, Spec


class GaussianPriorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(
        None, description="latent shape without the batch; None takes the data's image shape (x_T of a diffusion model)"
    )


class GaussianPrior(Prior):
    """``z ~ N(0, I)``: a GAN's noise, a VAE's prior, a diffusion model's x_T."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.produces = Spec(shape=self.shape)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        return torch.randn((n, *self.shape), generator=generator, device=self._device_probe.device)

    def log_prob(self, z: Tensor) -> Tensor:
        d = z[0].numel()
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)


def make_gaussian_prior(cfg: GaussianPriorConfig, ctx) -> GaussianPrior:
    if cfg.shape is not None:
        return GaussianPrior(tuple(cfg.shape))
    if ctx.data is None:
        from genzoo.errors import RegistryError

        raise RegistryError("prior 'gaussian': field 'shape' is not set and there is no dataset to take it from; set shape")
    return GaussianPrior(tuple(ctx.data.image_shape))
