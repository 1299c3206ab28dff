"""Latent diffusion (Rombach et al. 2022): the shared diffusion decoder run on a first-stage autoencoder's latents.

The ``latent-diffusion`` decoder composes two registered decoders: ``autoencoder``, any decoder with the latent
interface (``genzoo.interfaces.LatentAutoencoder``: genzoo's ``vq-autoencoder`` and ``autoencoder``, diffusers'
``VQModel`` / ``AutoencoderKL`` adapters), and ``diffusion``, a diffusion decoder built for the latent shape
instead of the image shape. Training encodes images without gradient, multiplies by the scale factor (LDM Sec. 4.3.2,
fitted so the latents have unit std unless given) and trains the diffusion decoder on them; sampling runs the
diffusion decoder with the recipe's sampler and guidance from the prior's x_T (latent-shaped, as the prior is bound
to what this decoder consumes), divides by the scale and decodes with ``decode_latents``.

The ``latent-diffusion`` pipeline is the diffusion pipeline with a first stage in front: ``autoencoder`` (its own
``training_losses``; absent for a pretrained first stage that has none), then ``decoder``. An importer maps
diffusers' ``LDMPipeline`` onto it (docs/diffusion.md, "Latent diffusion").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.decoder import DiffusionPipeline, check_denoiser
from genzoo.errors import RegistryError
from genzoo.interfaces import Condition, Decoder, Spec, missing_latent_interface
from genzoo.pipelines import Conditioning, labelled_args
from genzoo.registry import component, registered_name, spec_field

FIT_IMAGES = 1024  # training images the scale factor is fitted on (LDM fits it on the first batch)


class LatentDiffusionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    autoencoder: dict[str, Any] = spec_field(
        "decoder",
        ...,
        "the first stage: a decoder with the latent interface (latent_shape, encode_latents, "
        "decode_latents), e.g. {type: vq-autoencoder, ...} or {type: autoencoder, ...}",
    )
    diffusion: dict[str, Any] = spec_field(
        "decoder",
        ...,
        "the diffusion decoder over the latents, built for the latent shape (leave its image_size null; "
        "clip_range: null for unbounded latents), e.g. {type: diffusion-decoder, clip_range: null, "
        "denoiser: {...}}",
    )
    scale_factor: float | None = Field(
        None,
        gt=0,
        description="latents are multiplied by this after encoding and divided by it before decoding (LDM Sec. 4.3.2; "
        "SD's 0.18215); None: 1 / std of the training latents, fitted when the diffusion stage starts",
    )


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


class LatentDiffusion(Decoder):
    """``decode(z_T) = autoencoder.decode_latents(diffusion.decode(z_T) / scale)``; ``training_losses(x)`` trains the
    diffusion decoder on ``scale * autoencoder.encode_latents(x)`` (encoded without gradient, in eval mode).

    ``diffusion`` and ``denoiser`` are the inner decoder's Gaussian process and network, so code written for a
    diffusion decoder (the diffusion pipeline, ``check_denoiser``, compiling denoisers) works unchanged.
    """

    def __init__(self, *, autoencoder: nn.Module, diffusion_decoder: nn.Module, scale_factor: float | None) -> None:
        super().__init__()
        self.autoencoder, self.diffusion_decoder = autoencoder, diffusion_decoder
        self.consumes, self.produces = Spec(shape=tuple(autoencoder.latent_shape)), autoencoder.produces
        self.sampler_kind = diffusion_decoder.sampler_kind
        self.needs_condition = getattr(diffusion_decoder, "needs_condition", frozenset())
        self.register_buffer("scale", torch.tensor(1.0 if scale_factor is None else float(scale_factor)))
        self.register_buffer("scale_fitted", torch.tensor(scale_factor is not None))

    @property
    def diffusion(self) -> Any:
        return self.diffusion_decoder.diffusion

    @property
    def denoiser(self) -> nn.Module:
        return self.diffusion_decoder.denoiser

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """The diffused latents of images ``x``: ``scale * autoencoder.encode_latents(x)``."""
        with _eval_mode(self.autoencoder):
            z = self.autoencoder.encode_latents(x)
        return z * self.scale.to(z.dtype)

    def decode_scaled(self, z: Tensor) -> Tensor:
        """Images in [-1, 1] from diffused latents: ``autoencoder.decode_latents(z / scale)``, clamped."""
        with _eval_mode(self.autoencoder):
            return self.autoencoder.decode_latents(z / self.scale.to(z.dtype)).clamp(-1, 1)

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        z0 = self.diffusion_decoder.decode(z, condition, generator=generator, sampler=sampler, guidance=guidance)
        return self.decode_scaled(z0)

    def training_losses(self, x0: Tensor, cond: Condition | None = None) -> dict[str, Tensor]:
        """The diffusion decoder's loss on the scaled latents of the images ``x0``."""
        return self.diffusion_decoder.training_losses(self.encode(x0), cond)

    @torch.no_grad()
    def fit_scale(self, images: Tensor, *, batch: int = 256) -> float:
        """Set the scale to 1 / std of the latents of the first :data:`FIT_IMAGES` ``images`` (all elements, as LDM),
        unless it was given or is already fitted (a resumed or initialised run keeps its own); returns it."""
        if not bool(self.scale_fitted):
            x = images[:FIT_IMAGES]
            with _eval_mode(self.autoencoder):
                z = torch.cat(
                    [
                        self.autoencoder.encode_latents(x[i : i + batch].to(self.scale.device)).float()
                        for i in range(0, len(x), batch)
                    ]
                )
            self.scale.fill_(1.0 / float(z.flatten().std().clamp(min=1e-8)))
            self.scale_fitted.fill_(True)
        return float(self.scale)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        """The first stage's round trip of images ``x`` (what no amount of diffusion training can beat)."""
        return self.decode_scaled(self.encode(x))


@component("decoder", "latent-diffusion", config=LatentDiffusionConfig)
def make_latent_diffusion(cfg: LatentDiffusionConfig, ctx) -> LatentDiffusion:
    """Latent diffusion (Rombach et al. 2022): a diffusion decoder over the latents of a first-stage autoencoder.

    ``autoencoder`` is any decoder with the latent interface; ``diffusion`` is built for its latent shape.
    """
    where = "decoder 'latent-diffusion': "
    if ctx.data is None:
        raise RegistryError(f"{where}needs a dataset to size its autoencoder")
    ae = ctx.registry.build("decoder", cfg.autoencoder, data=ctx.data, where=f"{where}autoencoder: ")
    missing = missing_latent_interface(ae)
    if missing:
        raise RegistryError(
            f"{where}field 'autoencoder': decoder '{registered_name(ae)}' has no latent interface "
            f"(no {', '.join(missing)}); use a decoder that encodes images to latents, e.g. {{type: vq-autoencoder}} "
            "or {type: autoencoder} "
            "(genzoo.interfaces.LatentAutoencoder)"
        )
    latent = tuple(int(s) for s in ae.latent_shape)
    spec = dict(cfg.diffusion)
    if spec.get("image_size") is not None:
        raise RegistryError(
            f"{where}field 'diffusion': image_size is {spec['image_size']}, but the autoencoder's "
            f"latent shape {latent} sizes the diffusion decoder; leave diffusion.image_size null"
        )
    latent_data = dataclasses.replace(ctx.data, image_shape=latent)
    try:
        inner = ctx.registry.build("decoder", spec, data=latent_data, where=f"{where}diffusion: ")
    except (ValueError, TypeError) as e:  # a network that cannot take this shape (a U-Net on a vector)
        hint = (
            "; a vector latent needs a denoiser for vectors: denoiser: {type: mlp-denoiser}" if len(latent) == 1 else ""
        )
        raise RegistryError(f"{where}field 'diffusion' cannot be built for the latent shape {latent}: {e}{hint}") from e
    shape = getattr(inner, "consumes", Spec()).shape
    if (
        getattr(inner, "sampler_kind", None) is None
        or not callable(getattr(inner, "training_losses", None))
        or shape is None
        or tuple(shape) != latent
    ):
        raise RegistryError(
            f"{where}field 'diffusion': decoder '{registered_name(inner)}' must be an iterative "
            f"decoder (e.g. {{type: diffusion-decoder}}) over the latent shape {latent}; it consumes "
            f"{None if shape is None else tuple(shape)}"
        )
    return LatentDiffusion(autoencoder=ae, diffusion_decoder=inner, scale_factor=cfg.scale_factor)


# --------------------------------------------------------------------------- pipeline


class LatentDiffusionPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(
        Conditioning.none, description="none; class (the dataset's label is y); caption (through the text encoder)"
    )


class LatentDiffusionPipeline(DiffusionPipeline):
    """The diffusion pipeline with the first stage in front: stages ``autoencoder`` (its own ``training_losses``;
    skipped for a first stage without one, a pretrained autoencoder) and ``decoder`` (the diffusion decoder on the
    frozen autoencoder's latents; the scale factor is fitted when it begins)."""

    def __init__(self, components: Mapping[str, Any], *, condition: Conditioning, num_classes: int | None) -> None:
        super().__init__(components, condition=condition, num_classes=num_classes)
        trainable = callable(getattr(components["decoder"].autoencoder, "training_losses", None))
        self.stages = (("autoencoder",) if trainable else ()) + self.stages

    def optimizer_groups(self, stage: str = "decoder") -> dict[str, list[nn.Parameter]]:
        dec = self.components["decoder"]
        if stage == "autoencoder":
            modules = [dec.autoencoder]
        else:
            modules = [dec.diffusion_decoder, self.components.get("encoder")]
        return {"main": [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]}

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "decoder"
    ) -> dict[str, Tensor]:
        if stage == "autoencoder":
            return self.components["decoder"].autoencoder.training_losses(batch["image"])
        return super().training_losses(batch, optimizer=optimizer, stage=stage)

    def begin_stage(self, stage: str, data: Mapping[str, Any]) -> None:
        if stage == "decoder":  # after the first stage, on its final (averaged) weights; the scale is a buffer
            self.components["decoder"].fit_scale(data["image"])

    def ready_to_sample(self) -> bool:
        return bool(self.components["decoder"].scale_fitted)

    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.components["decoder"].reconstruct(x)


TRAINS_ON_IMAGES = {"upsampler": "upsampler_decoder", "clip": "clip", "guidance": "guidance"}


@component("pipeline", "latent-diffusion", config=LatentDiffusionPipelineConfig)
def make_latent_diffusion_pipeline(cfg: LatentDiffusionPipelineConfig, ctx) -> LatentDiffusionPipeline:
    """Latent diffusion (Rombach et al. 2022): the first-stage autoencoder, then the diffusion decoder on its
    latents; unconditional, class- or caption-conditional."""
    dec = ctx.components.get("decoder")
    if dec is None or not callable(getattr(dec, "fit_scale", None)):
        raise RegistryError(
            "pipeline 'latent-diffusion' needs decoder: {type: latent-diffusion, autoencoder: {...}, diffusion: {...}}"
        )
    args = labelled_args("latent-diffusion", cfg.condition, ctx)
    encoder = ctx.components.get("encoder")
    width = getattr(encoder, "width", None) if cfg.condition is Conditioning.caption else None
    want = {"context_dim": width, "emb_dim_in": width} if width else {}
    check_denoiser("latent-diffusion", ctx.components, want, "the text encoder")
    pipeline = LatentDiffusionPipeline(ctx.components, **args)
    for stage in pipeline.stages:
        if stage in TRAINS_ON_IMAGES:
            role = TRAINS_ON_IMAGES[stage]
            raise RegistryError(
                f"pipeline 'latent-diffusion': components.{role} '{registered_name(ctx.components[role])}' trains on "
                "images, but "
                "this decoder diffuses latents; remove it (to guide on latents use guidance: {type: cfg} with "
                "decoder.diffusion.cond_drop > 0)"
            )
    return pipeline
