"""VQ-VAE (van den Oord et al. 2017): a tokenizer of images into a grid of codes, then a prior over codes.

The ``vq-autoencoder`` decoder holds the encoder, the :class:`~genzoo.nn.quantize.VectorQuantizer`
and the decoder; it consumes a (H/f, W/f) grid of code indices. The ``vqvae`` pipeline trains in
two stages (Sec. 3.2): ``tokenizer`` (reconstruction + codebook + beta * commitment), then
``prior`` on the codes of the frozen tokenizer (an autoregressive GPT; the ``uniform-tokens``
prior has nothing to train, so that stage is skipped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.nn.convnets import CodeGridConfig, grid_networks
from genzoo.nn.quantize import VectorQuantizer
from genzoo.pipelines import Conditioning, TokenPipeline, make_token_pipeline
from genzoo.registry import component


class VQAutoencoderConfig(CodeGridConfig):
    model_config = ConfigDict(extra="forbid")
    beta: float = Field(0.25, ge=0, description="weight of the commitment term ||z_e - sg(e)||^2 (Eq. 3)")
    ema: bool = Field(False, description="update the codebook by moving averages instead of gradients (App. A.1)")
    decay: float = Field(0.99, gt=0, lt=1, description="decay of the EMA codebook")
    restart_threshold: float = Field(
        0.03, ge=0, description="restart codes used less than this fraction of the average (0: never)"
    )


class VQAutoencoder(Decoder):
    """``encode_image(x) -> (z_q, codes, terms)``, ``encode_codes(x)`` (no codebook update), ``decode(codes)``.

    Latent interface (``genzoo.interfaces.LatentAutoencoder``), as LDM's VQ first stages: ``latent_shape``
    (code_dim, h, w), ``encode_latents`` (the pre-quantisation z_e), ``decode_latents`` (nearest codes, then the
    decoder), ``training_losses``.
    """

    def __init__(
        self, encoder: nn.Module, decoder: nn.Module, quantizer: VectorQuantizer, grid: tuple[int, int], image_shape
    ) -> None:
        super().__init__()
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.consumes = Spec(shape=grid, dtype="long", vocab_size=quantizer.num_codes)
        self.produces = Spec(shape=tuple(image_shape))

    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.quantizer(self.encoder(x))

    def training_losses(self, x: Tensor) -> dict[str, Tensor]:
        """Reconstruction + codebook + beta * commitment (Eq. 3); the batch's code perplexity."""
        z_q, _, terms = self.encode_image(x)
        mse = F.mse_loss(self.decoder(z_q), x)
        return {
            "loss": mse + terms["codebook"] + terms["commitment"],
            "mse": mse.detach(),
            "perplexity": terms["perplexity"],
            "commitment": terms["commitment"].detach(),
        }

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        z_e = self.encoder(x)
        b, d, h, w = z_e.shape
        return self.quantizer.quantize(z_e.permute(0, 2, 3, 1).reshape(-1, d).float()).view(b, h, w)

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.decoder(self.quantizer.embed(z)).clamp(-1, 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return (self.quantizer.dim, *self.consumes.shape)

    def encode_latents(self, x: Tensor) -> Tensor:
        """The encoder's continuous grid z_e (B, code_dim, h, w), before quantisation."""
        return self.encoder(x)

    def decode_latents(self, z: Tensor) -> Tensor:
        """Each vector of ``z`` snapped to its nearest code (no codebook update), then decoded."""
        b, d, h, w = z.shape
        return self.decode(self.quantizer.quantize(z.permute(0, 2, 3, 1).reshape(-1, d)).view(b, h, w))


@component("decoder", "vq-autoencoder", config=VQAutoencoderConfig)
def make_vq_autoencoder(cfg: VQAutoencoderConfig, ctx) -> VQAutoencoder:
    """Encoder, vector quantiser (codebook) and decoder over a grid of discrete codes."""
    grid, *nets = grid_networks(cfg, ctx, "decoder 'vq-autoencoder'", cfg.code_dim)
    vq = VectorQuantizer(
        cfg.codebook_size,
        cfg.code_dim,
        beta=cfg.beta,
        ema=cfg.ema,
        decay=cfg.decay,
        restart_threshold=cfg.restart_threshold,
    )
    return VQAutoencoder(*nets, vq, grid, ctx.data.image_shape)


class VQVAEPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(
        Conditioning.none, description="none, or class: the prior is conditioned on the label"
    )


@component("pipeline", "vqvae", config=VQVAEPipelineConfig)
def make_vqvae_pipeline(cfg: VQVAEPipelineConfig, ctx) -> TokenPipeline:
    """VQ-VAE (van den Oord et al. 2017): a codebook tokenizer, then a prior over the code grid."""
    return make_token_pipeline("vqvae", cfg.condition, ctx)
