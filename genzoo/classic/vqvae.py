"""VQ-VAE (van den Oord et al. 2017): a tokenizer of images into a grid of codes, then a prior over codes.

The ``vq-autoencoder`` decoder holds the encoder, the :class:`~genzoo.nn.quantize.VectorQuantizer`
and the decoder; it consumes a (H/f, W/f) grid of code indices. The ``vqvae`` pipeline trains in
two stages (Sec. 3.2): ``tokenizer`` (reconstruction + codebook + beta * commitment), then
``prior`` on the codes of the frozen tokenizer (an autoregressive GPT; the ``uniform-tokens``
prior has nothing to train, so that stage is skipped).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import RegistryError
from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.nn.quantize import VectorQuantizer
from genzoo.pipelines import Conditioning, LabelledPipeline, labelled_args


class VQAutoencoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    codebook_size: int = Field(256, ge=2, description="number of codes K")
    code_dim: int = Field(64, ge=1, description="dimension D of each code vector")
    downsample: int = Field(4, description="image side / code-grid side: 2, 4 or 8")
    beta: float = Field(0.25, ge=0, description="weight of the commitment term ||z_e - sg(e)||^2 (Eq. 3)")
    ema: bool = Field(False, description="update the codebook by moving averages instead of gradients (App. A.1)")
    decay: float = Field(0.99, gt=0, lt=1, description="decay of the EMA codebook")
    restart_threshold: float = Field(0.03, ge=0, description="restart codes used less than this fraction of the average (0: never)")
    encoder: dict[str, Any] = Field(default_factory=lambda: {"type": "grid-encoder"}, description="image -> grid network",
                                    json_schema_extra={"kind": "network"})
    decoder: dict[str, Any] = Field(default_factory=lambda: {"type": "grid-decoder"}, description="grid -> image network",
                                    json_schema_extra={"kind": "network"})


class VQAutoencoder(Decoder):
    """``encode_image(x) -> (z_q, codes, terms)``, ``encode_codes(x)`` (no codebook update), ``decode(codes)``."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, quantizer: VectorQuantizer, grid: tuple[int, int], image_shape) -> None:
        super().__init__()
        self.encoder, self.decoder, self.quantizer = encoder, decoder, quantizer
        self.consumes = Spec(shape=grid, dtype="long", vocab_size=quantizer.num_codes)
        self.produces = Spec(shape=tuple(image_shape))

    def encode_image(self, x: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        return self.quantizer(self.encoder(x))

    @torch.no_grad()
    def encode_codes(self, x: Tensor) -> Tensor:
        z_e = self.encoder(x)
        b, d, h, w = z_e.shape
        return self.quantizer.quantize(z_e.permute(0, 2, 3, 1).reshape(-1, d).float()).view(b, h, w)

    def decode(self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        return self.decoder(self.quantizer.embed(z)).clamp(-1, 1)


def make_vq_autoencoder(cfg: VQAutoencoderConfig, ctx) -> VQAutoencoder:
    if ctx.data is None:
        raise RegistryError("decoder 'vq-autoencoder' needs a dataset to size its networks")
    c, h, w = ctx.data.image_shape
    if h % cfg.downsample or w % cfg.downsample:
        raise RegistryError(f"decoder 'vq-autoencoder': field 'downsample' ({cfg.downsample}) must divide the image side {h}")
    nets = []
    for role in ("encoder", "decoder"):
        spec = dict(getattr(cfg, role))
        if spec.get("downsample") not in (None, cfg.downsample):
            raise RegistryError(f"decoder 'vq-autoencoder': {role}.downsample is {spec['downsample']} but downsample is "
                                f"{cfg.downsample}; set only the decoder's downsample")
        spec.update(dim=cfg.code_dim, downsample=cfg.downsample)
        nets.append(ctx.registry.build("network", spec, data=ctx.data, where=f"decoder 'vq-autoencoder': {role}: "))
    vq = VectorQuantizer(cfg.codebook_size, cfg.code_dim, beta=cfg.beta, ema=cfg.ema, decay=cfg.decay,
                         restart_threshold=cfg.restart_threshold)
    return VQAutoencoder(*nets, vq, (h // cfg.downsample, w // cfg.downsample), ctx.data.image_shape)


class VQVAEPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(Conditioning.none, description="none, or class: the prior is conditioned on the label")


class VQVAEPipeline(LabelledPipeline):
    """Stages ``tokenizer`` then ``prior``; logs reconstruction MSE and the codebook perplexity."""

    def __init__(self, components, **kw) -> None:
        super().__init__(components, **kw)
        trainable_prior = callable(getattr(components.get("prior"), "training_losses", None))
        self.stages = ("tokenizer", "prior") if trainable_prior else ("tokenizer",)

    def optimizer_groups(self, stage: str = "tokenizer") -> dict[str, list[nn.Parameter]]:
        module = self.components["prior" if stage == "prior" else "decoder"]
        return {"main": [p for p in module.parameters() if p.requires_grad]}

    def training_losses(self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "tokenizer") -> dict[str, Tensor]:
        vq, x = self.components["decoder"], batch["image"]
        if stage == "prior":
            return self.components["prior"].training_losses(vq.encode_codes(x), self.condition_of(batch))
        z_q, _, terms = vq.encode_image(x)
        mse = F.mse_loss(vq.decoder(z_q), x)
        loss = mse + terms["codebook"] + terms["commitment"]
        return {"loss": loss, "mse": mse.detach(), "perplexity": terms["perplexity"],
                "commitment": terms["commitment"].detach()}

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        vq = self.components["decoder"]
        return vq.decode(vq.encode_codes(x))

    @torch.no_grad()
    def codebook_usage(self, images: Tensor, batch: int = 512) -> dict[str, float]:
        """Over ``images``: the perplexity of the code histogram and the fraction of codes used at least once."""
        vq = self.components["decoder"]
        codes = torch.cat([vq.encode_codes(images[i:i + batch]) for i in range(0, len(images), batch)]).flatten()
        counts = torch.bincount(codes, minlength=vq.quantizer.num_codes).double()
        p = counts / counts.sum()
        perplexity = torch.exp(-(p[p > 0] * p[p > 0].log()).sum())
        return {"perplexity": float(perplexity), "used_fraction": float((counts > 0).double().mean()),
                "codebook_size": vq.quantizer.num_codes}


def make_vqvae_pipeline(cfg: VQVAEPipelineConfig, ctx) -> VQVAEPipeline:
    dec = ctx.components.get("decoder")
    if dec is None or not hasattr(dec, "encode_codes"):
        raise RegistryError("pipeline 'vqvae' needs decoder: {type: vq-autoencoder}")
    return VQVAEPipeline(ctx.components, **labelled_args("vqvae", cfg.condition, ctx))
