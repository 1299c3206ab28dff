"""Autoencoders: AE, denoising AE (Vincent et al. 2008) and VAE (Kingma & Welling 2014).

One decoder component, ``autoencoder``, holds the encoder and decoder networks (a latent vector of
``latent_dim``); the family is the pipeline: ``autoencoder`` minimises the reconstruction error
from a clean or corrupted input, ``vae`` maximises the ELBO. An AE is not generative on its own:
after training its pipeline fits the prior component (``fitted-gaussian`` or ``gmm``) on the
training latents. A VAE samples from its ``gaussian`` prior.

The VAE's likelihood is a discretised Gaussian over the 256 pixel levels with a learned
per-channel scale, so its bits/dim (ELBO, and the importance-weighted bound of Burda et al.
2016, Eq. 8) are comparable with the diffusion models' (Ho et al. 2020, Eq. 13).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.gaussian_diffusion import discretized_gaussian_log_likelihood
from genzoo.errors import RegistryError
from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.pipelines import Conditioning, LabelledPipeline
from genzoo.priors import fit_latent_prior
from genzoo.registry import component, spec_field


class AutoencoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latent_dim: int = Field(32, ge=1, description="size of the latent vector z")
    variational: bool = Field(False, description="the encoder outputs a mean and a log-variance (VAE)")
    encoder: dict[str, Any] = spec_field(
        "network", {"type": "conv-encoder", "norm": "group"}, "image -> latent network"
    )
    decoder: dict[str, Any] = spec_field(
        "network", {"type": "conv-decoder", "norm": "group"}, "latent -> image network"
    )
    first_stage_kl_weight: float = Field(
        1e-3,
        ge=0,
        description="variational, trained as another family's first stage (latent diffusion) through its own "
        "training_losses: weight of the KL per latent dim against the per-pixel MSE (LDM's KL-reg, "
        "Rombach et al. 2022 Sec. 3); the vae pipeline trains the ELBO instead",
    )


class Autoencoder(Decoder):
    """``encode_image(x) -> (mu, logvar | None)``; ``decode(z)`` is the decoder network's mean image.

    Latent interface (``genzoo.interfaces.LatentAutoencoder``): ``latent_shape`` (latent_dim,), ``encode_latents``
    (the posterior mean), ``decode_latents``, ``training_losses`` (MSE, + the KL for a VAE) as a first stage.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        *,
        latent_dim: int,
        variational: bool,
        image_shape,
        first_stage_kl_weight: float = 1e-3,
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.variational = encoder, decoder, variational
        self.first_stage_kl_weight = first_stage_kl_weight
        self.consumes, self.produces = Spec(shape=(latent_dim,)), Spec(shape=tuple(image_shape))
        self.log_scale = nn.Parameter(torch.full((image_shape[0],), math.log(0.1)))  # VAE likelihood scale per channel

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        h = self.encoder(x)
        return h.chunk(2, dim=1) if self.variational else (h, None)

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.decoder(z)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self.consumes.shape)

    def encode_latents(self, x: Tensor) -> Tensor:
        """The latent vector of ``x``: the code (AE) or the posterior mean (VAE)."""
        return self.encode_image(x)[0]

    def decode_latents(self, z: Tensor) -> Tensor:
        return self.decoder(z)

    def training_losses(self, x: Tensor) -> dict[str, Tensor]:
        """As a first stage: per-pixel MSE of the reconstruction (from a posterior draw for a VAE) plus
        ``first_stage_kl_weight`` times the KL to N(0, I) per latent dim."""
        mu, logvar = self.encode_image(x)
        z = mu if logvar is None else mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)
        mse = F.mse_loss(self.decoder(z), x)
        if logvar is None:
            return {"loss": mse, "mse": mse.detach()}
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp())).mean()
        return {"loss": mse + self.first_stage_kl_weight * kl, "mse": mse.detach(), "kl": kl.detach()}

    def log_likelihood(self, x: Tensor, mean: Tensor) -> Tensor:
        """log p(x | z) in nats per image, discretised to 8 bits."""
        log_scales = self.log_scale.view(1, -1, 1, 1).expand_as(mean)
        return discretized_gaussian_log_likelihood(x, means=mean, log_scales=log_scales).flatten(1).sum(1)


@component("decoder", "autoencoder", config=AutoencoderConfig)
def make_autoencoder(cfg: AutoencoderConfig, ctx) -> Autoencoder:
    """Conv encoder and decoder with a latent vector; deterministic (AE/DAE) or Gaussian posterior (VAE)."""
    if ctx.data is None:
        raise RegistryError("decoder 'autoencoder' needs a dataset to size its networks")
    out = cfg.latent_dim * (2 if cfg.variational else 1)
    enc = ctx.registry.build(
        "network", {**cfg.encoder, "dim": out}, data=ctx.data, where="decoder 'autoencoder': encoder: "
    )
    dec = ctx.registry.build(
        "network", {**cfg.decoder, "dim": cfg.latent_dim}, data=ctx.data, where="decoder 'autoencoder': decoder: "
    )
    return Autoencoder(
        enc,
        dec,
        latent_dim=cfg.latent_dim,
        variational=cfg.variational,
        image_shape=ctx.data.image_shape,
        first_stage_kl_weight=cfg.first_stage_kl_weight,
    )


def _encode_all(ae: Autoencoder, images: Tensor, batch: int = 512) -> Tensor:
    """The latent means of ``images``, in eval mode, in batches."""
    was = ae.training
    ae.eval()
    device = next(ae.parameters()).device
    with torch.no_grad():
        z = torch.cat([ae.encode_image(images[i : i + batch].to(device))[0] for i in range(0, len(images), batch)])
    ae.train(was)
    return z


# --------------------------------------------------------------------------- AE / DAE


class Corruption(str, Enum):
    none = "none"
    gaussian = "gaussian"
    mask = "mask"


class AEPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    corruption: Corruption = Field(
        Corruption.none, description="none (AE), gaussian or mask (denoising AE, Vincent et al. 2008)"
    )
    noise_std: float = Field(0.3, ge=0, description="std of the additive Gaussian corruption (images in [-1, 1])")
    mask_prob: float = Field(
        0.25, ge=0, lt=1, description="probability that a pixel is zeroed by the masking corruption"
    )


class AutoencodingPipeline(LabelledPipeline):
    """What the AE and VAE pipelines share: an unconditional pipeline around an :class:`Autoencoder`."""

    def __init__(self, components, *, cfg: BaseModel) -> None:
        super().__init__(components, condition=Conditioning.none, num_classes=None)
        self.cfg = cfg

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """x through the bottleneck: the decoded code (AE) or posterior mean (VAE)."""
        ae = self.components["decoder"]
        return ae.decode(ae.encode_image(x)[0])


class AEPipeline(AutoencodingPipeline):
    """``||x - D(E(c(x)))||^2`` for a corruption ``c``; fits the prior on ``E(x)`` after training."""

    def corrupt(self, x: Tensor) -> Tensor:
        if self.cfg.corruption is Corruption.gaussian:
            return x + self.cfg.noise_std * torch.randn_like(x)
        if self.cfg.corruption is Corruption.mask:  # masking noise: a pixel's channels are zeroed together
            keep = torch.rand_like(x[:, :1]) >= self.cfg.mask_prob
            return x * keep
        return x

    def optimizer_groups(self, stage: str = "main") -> dict[str, list[nn.Parameter]]:
        ae = self.components["decoder"]
        return {"main": [p for n, p in ae.named_parameters() if n != "log_scale"]}

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "main"
    ) -> dict[str, Tensor]:
        ae, x = self.components["decoder"], batch["image"]
        recon = ae.decode(ae.encode_image(self.corrupt(x))[0])
        mse = F.mse_loss(recon, x)
        return {"loss": mse, "mse": mse.detach()}

    def fit_after_training(self, data: Mapping[str, Tensor]) -> None:
        fit_latent_prior(self.components["prior"], _encode_all(self.components["decoder"], data["image"]))


@component("pipeline", "autoencoder", config=AEPipelineConfig)
def make_ae_pipeline(cfg: AEPipelineConfig, ctx) -> AEPipeline:
    """AE or denoising AE (Vincent et al. 2008): reconstruction loss, then a prior fitted to the latents."""
    dec = ctx.components.get("decoder")
    if dec is None or not hasattr(dec, "encode_image") or getattr(dec, "variational", False):
        raise RegistryError("pipeline 'autoencoder' needs decoder: {type: autoencoder, variational: false}")
    return AEPipeline(ctx.components, cfg=cfg)


# --------------------------------------------------------------------------- VAE


class VAEPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kl_weight: float = Field(1.0, ge=0, description="weight of the KL term (1: the ELBO; beta-VAE otherwise)")
    kl_warmup_steps: int = Field(0, ge=0, description="ramp the KL weight linearly from 0 over this many steps")
    iw_samples: int = Field(64, ge=1, description="importance samples K of the NLL bound reported by nll_bpd")
    free_bits: float = Field(
        0.0,
        ge=0,
        description="training only: each latent dim's batch-mean KL counts at least this "
        "many nats (Kingma et al. 2016, Eq. 15), against posterior collapse; the reported ELBO is exact",
    )


class VAEPipeline(AutoencodingPipeline):
    """Maximises ``E_q log p(x|z) - KL(q(z|x) || N(0, I))`` (Kingma & Welling 2014, Eq. 10); loss in nats per dim."""

    def __init__(self, components, *, cfg: VAEPipelineConfig) -> None:
        super().__init__(components, cfg=cfg)
        self.register_buffer("steps_seen", torch.zeros((), dtype=torch.long))

    def _terms(
        self, x: Tensor, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """log p(x|z), log p(z), log q(z|x) per image for one z ~ q, and the analytic KL."""
        vae = self.components["decoder"]
        mu, logvar = vae.encode_image(x)
        eps = torch.randn(mu.shape, generator=generator, device=mu.device, dtype=mu.dtype)
        z = mu + torch.exp(0.5 * logvar) * eps  # reparameterisation (Sec. 2.4)
        log_px = vae.log_likelihood(x, vae.decode(z))
        kl = -0.5 * (1 + logvar - mu.pow(2) - logvar.exp())  # per dim, Appendix B
        log_pz = -0.5 * (z.pow(2) + math.log(2 * math.pi)).sum(1)
        log_qz = -0.5 * (eps.pow(2) + logvar + math.log(2 * math.pi)).sum(1)
        return log_px, kl, log_pz, log_qz, z

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "main"
    ) -> dict[str, Tensor]:
        x = batch["image"]
        d = x[0].numel()
        log_px, kl_dims, *_ = self._terms(x)
        kl = kl_dims.sum(1)
        if self.training:
            self.steps_seen += 1
        w = self.cfg.kl_weight
        if self.cfg.kl_warmup_steps:
            w = w * torch.clamp(self.steps_seen.float() / self.cfg.kl_warmup_steps, max=1.0)
        kl_train = kl_dims.mean(0).clamp(min=self.cfg.free_bits).sum() if self.cfg.free_bits else kl.mean()
        loss = (-log_px.mean() + w * kl_train) / d
        elbo_bpd = (-log_px + kl).mean().detach() / (d * math.log(2))
        return {"loss": loss, "elbo_bpd": elbo_bpd, "kl": kl.mean().detach(), "recon_nats": -log_px.mean().detach()}

    @torch.no_grad()
    def nll_bpd(
        self, x: Tensor, *, k: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Per image: the negative ELBO and the K-sample importance-weighted bound, in bits/dim (Burda et al. Eq. 8).

        ``log p(x) >= log (1/K) sum_k p(x, z_k) / q(z_k | x)``; it tightens toward log p(x) as K grows.
        """
        k = k or self.cfg.iw_samples
        d = x[0].numel()
        log_w, neg_elbo = [], None
        for i in range(k):
            log_px, kl, log_pz, log_qz, _ = self._terms(x, generator)
            log_w.append(log_px + log_pz - log_qz)
            if i == 0:
                neg_elbo = -log_px + kl.sum(1)
        iw = torch.logsumexp(torch.stack(log_w), 0) - math.log(k)
        scale = d * math.log(2)
        return {"elbo_bpd": neg_elbo / scale, "iw_bpd": -iw / scale}


@component("pipeline", "vae", config=VAEPipelineConfig)
def make_vae_pipeline(cfg: VAEPipelineConfig, ctx) -> VAEPipeline:
    """VAE (Kingma & Welling 2014): the ELBO with a Gaussian posterior and the reparameterisation trick."""
    dec = ctx.components.get("decoder")
    if dec is None or not getattr(dec, "variational", False):
        raise RegistryError("pipeline 'vae' needs decoder: {type: autoencoder, variational: true}")
    return VAEPipeline(ctx.components, cfg=cfg)
