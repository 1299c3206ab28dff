"""Adapter components: a diffusers module behind genzoo's interfaces, built from its config or ``from_pretrained``.

* networks (a diffusion decoder's or prior's ``denoiser``, ``model(x_t, t, cond) -> output``): ``UNet2DModel``
  (DDPM, Ho et al. 2020), ``UNet2DConditionModel`` (latent diffusion, Rombach et al. 2022; with unCLIP's text
  projection, Ramesh et al. 2022 Sec. 2.1), ``PriorTransformer`` (the unCLIP prior);
* decoders with an image encoder (tokenizers of latent diffusion's first stage): ``VQModel`` and ``AutoencoderKL``.

Conditions come from genzoo's cond dict: ``y`` (class labels), ``context`` / ``context_mask`` (token states),
``emb`` (unCLIP's image embedding), ``text_emb`` (the pooled CLIP text embedding), ``drop`` / ``drop_emb`` (the
learned null of classifier-free guidance).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from genzoo.errors import RegistryError
from genzoo.interfaces import Condition, Decoder, Spec
from genzoo.nn.embeddings import either
from genzoo.registry import component

from .loading import from_pretrained


class ModuleConfig(BaseModel):
    """Where the diffusers module comes from: its config (random weights, then a checkpoint's) or a folder / hub id."""

    model_config = ConfigDict(extra="forbid")
    config: dict[str, Any] | None = Field(
        None, description="the module's diffusers config (the fields of its config.json)"
    )
    pretrained: str | None = Field(
        None, description="a local folder or hub id loaded with from_pretrained (safetensors only)"
    )
    subfolder: str | None = Field(None, description="the module's subfolder of a pipeline folder, e.g. unet")

    @model_validator(mode="after")
    def _one_source(self) -> ModuleConfig:
        if (self.config is None) == (self.pretrained is None):
            raise ValueError("set exactly one of config (a diffusers config) and pretrained (a folder or hub id)")
        return self


def build_module(class_name: str, cfg: ModuleConfig) -> nn.Module:
    """``diffusers.<class_name>`` from ``cfg``: ``from_config`` or ``from_pretrained``."""
    import diffusers

    cls = getattr(diffusers, class_name)
    if cfg.pretrained is not None:
        return from_pretrained(cls, cfg.pretrained, subfolder=cfg.subfolder)
    try:
        return cls.from_config({k: v for k, v in cfg.config.items() if not k.startswith("_")})
    except (TypeError, ValueError) as e:
        raise RegistryError(f"diffusers {class_name} rejects the config: {e}".splitlines()[0]) from e


def module_config(module: nn.Module) -> dict[str, Any]:
    """A diffusers module's config as stored in a recipe: JSON values, private keys dropped."""
    import json

    return json.loads(json.dumps({k: v for k, v in dict(module.config).items() if not k.startswith("_")}))


# --------------------------------------------------------------------------- networks


class NullCaption(nn.Module):
    """The empty prompt's CLIP encoding: z_t ``text_emb`` (D,), token states ``context`` (L, W) and ``context_mask``
    (L,). diffusers' unCLIP pipelines encode ``""`` for classifier-free guidance's unconditional half and where there
    is no caption (image variations), so this is the adapter's null caption; the importer fills it."""

    def __init__(self, *, dim: int, width: int, length: int) -> None:
        super().__init__()
        self.register_buffer("text_emb", torch.zeros(dim))
        self.register_buffer("context", torch.zeros(length, width))
        self.register_buffer("context_mask", torch.zeros(length, dtype=torch.bool))

    @torch.no_grad()
    def fill(self, text_emb: Tensor, context: Tensor, context_mask: Tensor) -> None:
        """Set it from one encoding: (1, D), (1, L, W), (1, L)."""
        self.text_emb.copy_(text_emb.reshape(self.text_emb.shape))
        self.context.copy_(context.reshape(self.context.shape))
        self.context_mask.copy_(context_mask.reshape(self.context_mask.shape).bool())

    def forward(
        self, batch: int, text_emb: Tensor | None, context: Tensor | None, mask: Tensor | None, drop: Tensor | None
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """The caption with the null in place of dropped samples; the null for every sample when there is none."""
        if text_emb is None:
            return (
                self.text_emb.expand(batch, -1),
                self.context.expand(batch, -1, -1),
                self.context_mask.expand(batch, -1),
            )
        if drop is None:
            return text_emb, context, mask
        d = drop[:, None]
        text_emb = torch.where(d, self.text_emb.to(text_emb.dtype), text_emb)
        if context is not None:
            if context.shape[1] != self.context.shape[0]:
                raise ValueError(
                    f"the caption has {context.shape[1]} tokens but the null caption {self.context.shape[0]}; "
                    "tokenize to the CLIP's context length"
                )
            context = torch.where(d[..., None], self.context.to(context.dtype), context)
            if mask is not None:
                mask = torch.where(d, self.context_mask, mask.bool())
        return text_emb, context, mask


NULL_CAPTION = Field(
    None,
    ge=1,
    description="the caption length (tokens) of the empty prompt's CLIP encoding kept as the null caption (buffers "
    "null_caption.*, set by `genzoo import`): used where cond's caption is dropped (CFG) or missing, as diffusers' "
    "unCLIP pipelines do; null: no null caption",
)


class UNet2DAdapter(nn.Module):
    """diffusers' ``UNet2DModel`` as a genzoo denoiser: ``forward(x_t, t, cond)``, ``cond['y']`` as its class labels
    when it has a class embedding (a classifier guidance's ``y`` passes an unconditional one by). As an upsampler
    (``low_res``), ``cond['low_res']`` is upsampled to x_t's size as diffusers' UnCLIPPipeline does (bicubic,
    antialiased) and concatenated after x_t on the channels."""

    def __init__(self, *, model: nn.Module, low_res: bool = False) -> None:
        super().__init__()
        self.model, self.low_res = model, low_res

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond = cond or {}
        labels = cond.get("y") if self.model.class_embedding is not None else None  # an unconditional model ignores y
        if self.low_res:
            if cond.get("low_res") is None:
                raise ValueError(
                    "network 'diffusers-unet2d' with low_res needs cond['low_res'] (the low-resolution image)"
                )
            up = F.interpolate(
                cond["low_res"].to(x.dtype), size=x.shape[-2:], mode="bicubic", align_corners=False, antialias=True
            )
            x = torch.cat([x, up], dim=1)
        return self.model(x, t, class_labels=labels).sample


CASCADE_SIZE = Field(
    None,
    ge=1,
    description="set by a cascade's diffusion decoder (its image_size); must equal the module's sample_size",
)


def _check_size(name: str, model: nn.Module, image_size: int | None) -> None:
    size = model.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    if image_size is not None and size is not None and int(size) != image_size:
        raise RegistryError(
            f"network '{name}': the decoder draws {image_size}x{image_size} but the module's sample_size is {size}"
        )


class UNet2DConfig(ModuleConfig):
    image_size: int | None = CASCADE_SIZE
    learn_sigma: bool | None = Field(
        None,
        description="set by the diffusion decoder for a learned-range variance; the module's "
        "out_channels must then be twice its image channels",
    )
    low_res: bool = Field(
        False,
        description="an upsampler: cond['low_res'] upsampled bicubically (antialiased, as diffusers' UnCLIPPipeline) "
        "to x_t's size and concatenated after it, so in_channels is twice the image channels (Karlo's super_res_*)",
    )


@component("network", "diffusers-unet2d", config=UNet2DConfig)
def build_unet2d(cfg: UNet2DConfig) -> UNet2DAdapter:
    """diffusers' UNet2DModel (DDPM, Ho et al. 2020) behind genzoo's denoiser interface."""
    model = build_module("UNet2DModel", cfg)
    _check_size("diffusers-unet2d", model, cfg.image_size)
    channels = model.config.in_channels // 2 if cfg.low_res else model.config.in_channels
    doubled = model.config.out_channels == 2 * channels
    if cfg.learn_sigma is not None and cfg.learn_sigma != doubled:
        raise RegistryError(
            f"network 'diffusers-unet2d': learn_sigma is {cfg.learn_sigma} but the UNet2DModel has "
            f"{model.config.out_channels} output channels for {channels} image channels"
        )
    return UNet2DAdapter(model=model, low_res=cfg.low_res)


class UNet2DConditionConfig(ModuleConfig):
    text_proj: dict[str, Any] | None = Field(
        None,
        description="config of unCLIP's UnCLIPTextProjModel (Ramesh et al. 2022, Sec. 2.1): cond['emb'] and "
        "cond['text_emb'] "
        "become the additive time embedding and extra context tokens; None: cond['context'] as is",
    )
    text_proj_subfolder: str | None = Field(
        None, description="with pretrained: the text projection's subfolder, e.g. text_proj"
    )
    learn_sigma: bool | None = Field(
        None,
        description="set by the diffusion decoder for a learned-range variance; out_channels must then be twice "
        "in_channels (Karlo's decoder)",
    )
    image_size: int | None = CASCADE_SIZE
    null_caption_length: int | None = NULL_CAPTION


class UNet2DConditionAdapter(nn.Module):
    """diffusers' ``UNet2DConditionModel`` as a genzoo denoiser: ``cond['context']`` -> encoder_hidden_states,
    ``cond['context_mask']`` -> its attention mask, ``cond['y']`` (or, with the unCLIP text projection, the projected
    ``cond['emb']`` + ``cond['text_emb']``) -> class_labels. With the text projection, ``drop`` / ``drop_emb`` put the
    projection's learned null image embedding in place of ``cond['emb']`` (unCLIP's classifier-free guidance)."""

    def __init__(
        self, *, model: nn.Module, text_proj: nn.Module | None = None, null_caption: NullCaption | None = None
    ) -> None:
        super().__init__()
        self.model, self.text_proj = model, text_proj
        if null_caption is not None:
            self.null_caption = null_caption

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond = cond or {}
        context, mask, labels = cond.get("context"), cond.get("context_mask"), cond.get("y")
        if self.text_proj is not None:
            emb = cond["emb"]
            drop = either(cond.get("drop"), cond.get("drop_emb"))
            if drop is not None:
                null = self.text_proj.learned_classifier_free_guidance_embeddings.to(emb.dtype)
                emb = torch.where(drop[:, None], null, emb)
            text_emb = cond.get("text_emb")
            null_caption = getattr(self, "null_caption", None)
            if null_caption is not None:  # the empty prompt where the caption is dropped or missing
                drop_text = either(cond.get("drop"), cond.get("drop_context"))
                text_emb, context, mask = null_caption(len(emb), text_emb, context, mask, drop_text)
            elif text_emb is None:
                raise ValueError("the unCLIP decoder needs cond['text_emb'] (or a null_caption_length)")
            context, labels = self.text_proj(
                image_embeddings=emb,
                prompt_embeds=text_emb,
                text_encoder_hidden_states=context,
                do_classifier_free_guidance=False,
            )
            if mask is not None:
                mask = F.pad(mask, (self.text_proj.clip_extra_context_tokens, 0), value=True)
        return self.model(x, t, encoder_hidden_states=context, class_labels=labels, attention_mask=mask).sample


@component("network", "diffusers-unet2d-condition", config=UNet2DConditionConfig)
def build_unet2d_condition(cfg: UNet2DConditionConfig) -> UNet2DConditionAdapter:
    """diffusers' UNet2DConditionModel (latent diffusion; the unCLIP decoder with its text projection)."""
    model = build_module("UNet2DConditionModel", cfg)
    _check_size("diffusers-unet2d-condition", model, cfg.image_size)
    text_proj = None
    if cfg.text_proj is not None or cfg.text_proj_subfolder is not None:
        from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

        if cfg.pretrained is not None and cfg.text_proj_subfolder is not None:
            text_proj = from_pretrained(UnCLIPTextProjModel, cfg.pretrained, subfolder=cfg.text_proj_subfolder)
        elif cfg.text_proj is not None:
            text_proj = UnCLIPTextProjModel.from_config(
                {k: v for k, v in cfg.text_proj.items() if not k.startswith("_")}
            )
        else:
            raise RegistryError(
                "text_proj_subfolder needs pretrained; with config, give the text projection's config as text_proj"
            )
    if cfg.learn_sigma is not None and cfg.learn_sigma != (model.config.out_channels == 2 * model.config.in_channels):
        raise RegistryError(
            f"network 'diffusers-unet2d-condition': learn_sigma is {cfg.learn_sigma} but the UNet2DConditionModel has "
            f"{model.config.out_channels} output channels for {model.config.in_channels} input channels"
        )
    null = None
    if cfg.null_caption_length is not None:
        if text_proj is None:
            raise RegistryError("network 'diffusers-unet2d-condition': null_caption_length needs the text projection")
        dim = int(text_proj.config.clip_embeddings_dim)
        null = NullCaption(dim=dim, width=dim, length=cfg.null_caption_length)
    return UNet2DConditionAdapter(model=model, text_proj=text_proj, null_caption=null)


class PriorTransformerConfig(ModuleConfig):
    null_caption_length: int | None = NULL_CAPTION


class PriorTransformerAdapter(nn.Module):
    """diffusers' ``PriorTransformer`` (the unCLIP prior, Ramesh et al. 2022, Sec. 2.2) as a genzoo denoiser over
    CLIP image embeddings: ``cond['text_emb']`` -> proj_embedding, ``cond['context']`` / ``cond['context_mask']`` ->
    the text encoder's states and mask. It predicts the (normalised) embedding itself: mean type x0."""

    def __init__(self, *, model: nn.Module, null_caption: NullCaption | None = None) -> None:
        super().__init__()
        self.model = model
        if null_caption is not None:
            self.null_caption = null_caption

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond = cond or {}
        text_emb, context, mask = cond.get("text_emb"), cond.get("context"), cond.get("context_mask")
        null_caption = getattr(self, "null_caption", None)
        if null_caption is not None:  # the empty prompt where the caption is dropped (CFG) or missing
            text_emb, context, mask = null_caption(len(x), text_emb, context, mask, cond.get("drop"))
        elif text_emb is None:
            raise ValueError("the unCLIP prior needs cond['text_emb'] (or a null_caption_length)")
        return self.model(
            x,
            t,
            proj_embedding=text_emb,
            encoder_hidden_states=context,
            attention_mask=None if mask is None else mask.bool(),
        ).predicted_image_embedding

    def unnormalize(self, z: Tensor) -> Tensor:
        """The CLIP image embedding from the prior's normalised output (``post_process_latents``: z std + mean)."""
        return self.model.post_process_latents(z)

    def normalize(self, z: Tensor) -> Tensor:
        """The inverse of :meth:`unnormalize`: what the prior diffuses."""
        return (z - self.model.clip_mean.to(z)) / self.model.clip_std.to(z)


@component("network", "diffusers-prior-transformer", config=PriorTransformerConfig)
def build_prior_transformer(cfg: PriorTransformerConfig) -> PriorTransformerAdapter:
    """diffusers' PriorTransformer (the unCLIP prior) behind genzoo's denoiser interface."""
    model = build_module("PriorTransformer", cfg)
    null = None
    if cfg.null_caption_length is not None:
        proj = model.encoder_hidden_states_proj
        width = proj.in_features if isinstance(proj, nn.Linear) else model.positional_embedding.shape[-1]
        dim = int(model.config.embedding_proj_dim or model.config.embedding_dim)
        null = NullCaption(dim=dim, width=int(width), length=cfg.null_caption_length)
    return PriorTransformerAdapter(model=model, null_caption=null)


# --------------------------------------------------------------------------- first-stage autoencoders


class LatentDecoder(Decoder):
    """Base of the autoencoder adapters: ``decode(latents) -> images``; ``encode_image(images) -> latents``."""

    def __init__(self, *, model: nn.Module, image_shape: tuple[int, int, int]) -> None:
        super().__init__()
        self.model = model
        factor = 2 ** (len(model.config.block_out_channels) - 1)
        c, h, w = image_shape
        self.latent_shape = (int(model.config.latent_channels), h // factor, w // factor)
        self.consumes, self.produces = Spec(shape=self.latent_shape), Spec(shape=tuple(image_shape))


def _image_shape(model: nn.Module, ctx: Any) -> tuple[int, int, int]:
    data = getattr(ctx, "data", None)
    if data is not None:
        return tuple(data.image_shape)
    size = model.config.sample_size
    size = size if isinstance(size, int) else size[0]
    return (int(model.config.in_channels), int(size), int(size))


class VQModelDecoder(LatentDecoder):
    """diffusers' ``VQModel`` (VQGAN, Esser et al. 2021; the first stage of latent diffusion): ``decode`` quantises the
    latents to the nearest codes and decodes them (``VQModel.decode``); ``encode_codes`` gives the code grid and
    ``decode_codes`` decodes one, as genzoo's VQ-VAE decoder does."""

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.model.decode(z).sample

    def encode_image(self, x: Tensor) -> Tensor:
        """Pre-quantisation latents (what a latent diffusion model diffuses)."""
        return self.model.encode(x).latents

    def encode_codes(self, x: Tensor) -> Tensor:
        """The (B, h, w) grid of nearest-code indices."""
        z = self.encode_image(x)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        codes = torch.cdist(flat, self.model.quantize.embedding.weight).argmin(1)
        return codes.view(z.shape[0], z.shape[2], z.shape[3])

    def decode_codes(self, codes: Tensor) -> Tensor:
        q = self.model.quantize.embedding(codes).permute(0, 3, 1, 2)
        return self.model.decode(q, force_not_quantize=True).sample

    # the latent interface (genzoo.interfaces.LatentAutoencoder): latent diffusion's first stage, unscaled
    def encode_latents(self, x: Tensor) -> Tensor:
        """Pre-quantisation latents ``model.encode(x).latents`` (LDM diffuses them before quantisation)."""
        return self.model.encode(x).latents

    def decode_latents(self, z: Tensor) -> Tensor:
        """``model.decode(z).sample``: quantised to the nearest codes, then decoded (as ``LDMPipeline`` decodes)."""
        return self.model.decode(z).sample


@component("decoder", "diffusers-vqmodel", config=ModuleConfig)
def build_vqmodel(cfg: ModuleConfig, ctx: Any = None) -> VQModelDecoder:
    """diffusers' VQModel (VQGAN; latent diffusion's first stage) as a genzoo decoder with an image encoder."""
    model = build_module("VQModel", cfg)
    return VQModelDecoder(model=model, image_shape=_image_shape(model, ctx))


class AutoencoderKLConfig(ModuleConfig):
    scale_latents: bool = Field(
        True,
        description="latents are multiplied by the model's scaling_factor after encoding and divided "
        "by it before decoding (Rombach et al. 2022, Sec. 4.3.2), as diffusers' pipelines do",
    )


class AutoencoderKLDecoder(LatentDecoder):
    """diffusers' ``AutoencoderKL`` (the KL-regularised first stage of latent diffusion, Rombach et al. 2022):
    ``decode(z) = vae.decode(z / s)``, ``encode_image(x) = s * mode(q(z | x))`` (or a draw with a generator)."""

    def __init__(self, *, model: nn.Module, image_shape: tuple[int, int, int], scale: float) -> None:
        super().__init__(model=model, image_shape=image_shape)
        self.scale = scale

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        return self.model.decode(z / self.scale).sample

    def encode_image(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        dist = self.model.encode(x).latent_dist
        return self.scale * (dist.mode() if generator is None else dist.sample(generator))

    # the latent interface, unscaled: the scale belongs to a latent-diffusion composition (its scale_factor)
    def encode_latents(self, x: Tensor) -> Tensor:
        """The posterior's mode ``model.encode(x).latent_dist.mode()``, not multiplied by the scaling factor."""
        return self.model.encode(x).latent_dist.mode()

    def decode_latents(self, z: Tensor) -> Tensor:
        """``model.decode(z).sample`` of unscaled latents."""
        return self.model.decode(z).sample


@component("decoder", "diffusers-autoencoder-kl", config=AutoencoderKLConfig)
def build_autoencoder_kl(cfg: AutoencoderKLConfig, ctx: Any = None) -> AutoencoderKLDecoder:
    """diffusers' AutoencoderKL (latent diffusion's KL first stage) as a genzoo decoder with an image encoder."""
    model = build_module("AutoencoderKL", cfg)
    scale = float(model.config.scaling_factor) if cfg.scale_latents else 1.0
    return AutoencoderKLDecoder(model=model, image_shape=_image_shape(model, ctx), scale=scale)
