"""DALL·E's discrete VAE (Ramesh et al. 2021, Sec. 2.1 and App. A): an image tokenizer trained with
the gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017).

The encoder gives logits over K codes at each grid position; in training the decoder sees the
relaxed one-hot ``softmax((logits + g) / tau)`` times the codebook, tau annealed from 1 to 1/16,
and the ELBO's KL to the uniform prior over codes, ``sum q log q + log K`` per position, has its
weight ramped up from 0 (the term that is easy to drop by mistake). Tokens are the argmax codes.
Reconstruction is MSE (a Gaussian likelihood); DALL·E's logit-Laplace is not implemented.
The schedules follow the tokenizer's own step counter, a buffer, so a resumed run continues them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.nn.convnets import CodeGridConfig, grid_networks
from genzoo.nn.quantize import perplexity
from genzoo.registry import component


class DiscreteVAEConfig(CodeGridConfig):
    model_config = ConfigDict(extra="forbid")
    temperature_start: float = Field(1.0, gt=0, description="gumbel-softmax temperature at step 0")
    temperature_end: float = Field(1 / 16, gt=0, description="temperature reached at temperature_steps (DALL·E: 1/16)")
    temperature_steps: int = Field(2000, ge=1, description="steps of the exponential temperature anneal")
    kl_weight: float = Field(
        1e-2,
        ge=0,
        description="weight of the KL to the uniform prior (per position, against per-pixel MSE); "
        "on shapes 1e-3 let the codebook collapse to 2 codes (DALL·E also raised it, to 6.6)",
    )
    kl_warmup_steps: int = Field(1000, ge=0, description="steps over which the KL weight rises linearly from 0")


class DiscreteVAE(Decoder):
    """``training_losses(x)``, ``encode_codes(x)`` (argmax tokens), ``decode(codes)``; consumes an (h, w) code grid."""

    def __init__(
        self, cfg: DiscreteVAEConfig, encoder: nn.Module, decoder: nn.Module, grid: tuple[int, int], image_shape
    ) -> None:
        super().__init__()
        self.cfg, self.encoder, self.decoder = cfg, encoder, decoder
        self.codebook = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.consumes = Spec(shape=grid, dtype="long", vocab_size=cfg.codebook_size)
        self.produces = Spec(shape=tuple(image_shape))

    @property
    def num_codes(self) -> int:
        return self.cfg.codebook_size

    def temperature(self) -> float:
        c, frac = self.cfg, min(1.0, int(self.step) / self.cfg.temperature_steps)
        return c.temperature_start * (c.temperature_end / c.temperature_start) ** frac

    def kl_weight(self) -> float:
        c = self.cfg
        return c.kl_weight * (min(1.0, int(self.step) / c.kl_warmup_steps) if c.kl_warmup_steps else 1.0)

    def training_losses(self, x: Tensor) -> dict[str, Tensor]:
        logits = self.encoder(x)  # (B, K, h, w)
        tau, beta = self.temperature(), self.kl_weight()
        soft = F.gumbel_softmax(logits, tau=tau, hard=False, dim=1)
        recon = self.decoder(torch.einsum("bkhw,kd->bdhw", soft, self.codebook.weight))
        mse = F.mse_loss(recon, x)
        log_q = F.log_softmax(logits.float(), dim=1)
        kl = (log_q.exp() * log_q).sum(1).mean() + math.log(self.num_codes)  # KL(q || uniform) per position, nats
        with torch.no_grad():
            self.step += 1
            usage = perplexity(torch.bincount(logits.argmax(1).flatten(), minlength=self.num_codes))
        return {
            "loss": mse + beta * kl,
            "mse": mse.detach(),
            "kl": kl.detach(),
            "perplexity": usage,
            "temperature": torch.tensor(tau),
            "kl_weight": torch.tensor(beta),
        }

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        return self.encoder(x).argmax(1)

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.decoder(self.codebook(z).permute(0, 3, 1, 2)).clamp(-1, 1)


@component("decoder", "dvae", config=DiscreteVAEConfig)
def make_dvae(cfg: DiscreteVAEConfig, ctx) -> DiscreteVAE:
    """DALL·E's discrete VAE: a Gumbel-softmax relaxed posterior over a code grid (Ramesh et al. 2021, Sec. 2.1)."""
    grid, *nets = grid_networks(cfg, ctx, "decoder 'dvae'", cfg.codebook_size)  # the encoder's logits over K
    return DiscreteVAE(cfg, *nets, grid, ctx.data.image_shape)
