"""Adapter components: DALLE2-pytorch's networks (lucidrains/DALLE2-pytorch, ``dalle2_pytorch.dalle2_pytorch``)
behind genzoo's interfaces, and its diffusion prior as a genzoo prior.

* ``dalle2-pytorch-prior-network`` (network): ``DiffusionPriorNetwork``, the causal transformer over [text token
  encodings, z_t, time, noised z_i, learned query] (unCLIP Sec. 2.2); ``forward(x_t, t, cond)`` reads ``text_emb``,
  ``context`` / ``context_mask`` and ``drop``.
* ``dalle2-pytorch-unet`` (network): ``Unet`` as the ``Decoder`` casts it per stage (``lowres_cond``,
  ``cond_on_image_embeds``, learned-variance ``channels_out``); reads ``emb``, ``context`` / ``context_mask``,
  ``low_res`` and ``drop`` / ``drop_emb`` / ``drop_context``.
* ``dalle2-pytorch-prior`` (prior): ``DiffusionPrior``: the shared diffusion decoder over z_i scaled by
  ``image_embed_scale`` (sqrt(d): Crowson's scaling, DALLE2-pytorch issue 60), a draw divided by it again and the best
  of ``best_of`` draws kept by similarity to z_t, as ``DiffusionPrior.sample``; not normalised to unit length.

DALLE2-pytorch drops a condition for a whole batch by probability (``text_cond_drop_prob``, ``image_cond_drop_prob``;
1 gives its learned nulls, as its ``forward_with_cond_scale``), genzoo per sample by mask: :func:`by_drop` runs each
group of samples that drop the same conditions with probability 0 or 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Prior, SamplerKind, Spec
from genzoo.nn.embeddings import either
from genzoo.priors import build_embedding_diffusion
from genzoo.registry import component, spec_field
from genzoo.text.clip import TEXT_KEYS


def by_drop(
    run: Callable[[Tensor | None, float, float], Tensor],
    batch: int,
    text_drop: Tensor | None,
    image_drop: Tensor | None,
) -> Tensor:
    """``run(index, text_drop_prob, image_drop_prob)`` once per group of samples dropping the same conditions
    (``index`` None: the whole batch), the outputs put back in batch order. The networks treat samples independently,
    so a group's outputs equal those of the whole batch run with the group's probabilities."""
    if text_drop is None and image_drop is None:
        return run(None, 0.0, 0.0)
    device = (text_drop if text_drop is not None else image_drop).device
    none = torch.zeros(batch, dtype=torch.bool, device=device)
    key = (none if text_drop is None else text_drop.bool()).long() * 2 + (
        none if image_drop is None else image_drop.bool()
    ).long()
    groups = [(k, (key == k).nonzero().squeeze(1)) for k in key.unique().tolist()]
    if len(groups) == 1:
        return run(None, float(groups[0][0] >= 2), float(groups[0][0] % 2))
    out = None
    for k, index in groups:
        part = run(index, float(k >= 2), float(k % 2))
        out = part.new_empty((batch, *part.shape[1:])) if out is None else out
        out[index] = part
    return out


def masked_context(cond: Mapping[str, Tensor], dtype: torch.dtype) -> Tensor | None:
    """The caption's token encodings with padding zeroed: DALLE2-pytorch finds padding as all-zero encodings (its CLIP
    adapters zero everything after the end-of-text token)."""
    context = cond.get("context")
    if context is None:
        return None
    mask = cond.get("context_mask")
    return (context if mask is None else context * mask[..., None]).to(dtype)


def _pick(index: Tensor | None) -> Callable[[Tensor | None], Tensor | None]:
    return lambda v: v if index is None or v is None else v[index]


# --------------------------------------------------------------------------- the prior's network


class PriorNetworkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    net: dict[str, Any] = Field(
        ...,
        description="DiffusionPriorNetwork's keyword arguments (its DiffusionPriorNetworkConfig fields: dim, depth, "
        "max_text_len, dim_head, heads, ...)",
    )
    text_encodings: bool = Field(
        True, description="DiffusionPrior's condition_on_text_encodings: the caption's token encodings are attended to"
    )


class PriorNetworkAdapter(nn.Module):
    """``DiffusionPriorNetwork`` as a genzoo denoiser over z_i: ``cond['text_emb']`` -> text_embed,
    ``cond['context']`` (padding zeroed) -> text_encodings. ``drop`` (classifier-free guidance's null half) drops the
    caption and the noised embedding, as ``forward_with_cond_scale`` does; without a caption the text is dropped."""

    def __init__(self, *, model: nn.Module, text_encodings: bool) -> None:
        super().__init__()
        self.model, self.text_encodings = model, text_encodings

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond = cond or {}
        text_emb, drop = cond.get("text_emb"), cond.get("drop")
        text_drop = drop
        if text_emb is None:  # no caption: any vector, replaced by the learned null below
            text_emb = x.new_zeros(x.shape)
            text_drop = torch.ones(len(x), dtype=torch.bool, device=x.device)
        encodings = masked_context(cond, x.dtype) if self.text_encodings else None

        def run(index: Tensor | None, text_p: float, image_p: float) -> Tensor:
            pick = _pick(index)
            return self.model(
                pick(x),
                pick(t),
                text_embed=pick(text_emb.to(x.dtype)),
                text_encodings=pick(encodings),
                text_cond_drop_prob=text_p,
                image_cond_drop_prob=image_p,
            )

        return by_drop(run, len(x), text_drop, drop)


@component("network", "dalle2-pytorch-prior-network", config=PriorNetworkConfig)
def build_prior_network(cfg: PriorNetworkConfig) -> PriorNetworkAdapter:
    """DALLE2-pytorch's DiffusionPriorNetwork (unCLIP's prior transformer) behind genzoo's denoiser interface."""
    from dalle2_pytorch.dalle2_pytorch import DiffusionPriorNetwork

    if cfg.net.get("self_cond"):
        raise RegistryError(
            "network 'dalle2-pytorch-prior-network': field 'net.self_cond' is true: self-conditioning feeds the "
            "previous x0_hat back to the network, which genzoo's samplers do not do"
        )
    try:
        model = DiffusionPriorNetwork(**cfg.net)
    except TypeError as e:
        raise RegistryError(f"network 'dalle2-pytorch-prior-network': field 'net': {e}") from e
    return PriorNetworkAdapter(model=model, text_encodings=cfg.text_encodings)


# --------------------------------------------------------------------------- the decoder's U-Nets


class UnetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    unet: dict[str, Any] = Field(
        ...,
        description="Unet's keyword arguments as the Decoder casts them for its stage (dim, dim_mults, "
        "image_embed_dim, text_embed_dim, cond_on_image_embeds, cond_on_text_encodings, lowres_cond, channels, "
        "channels_out, ...)",
    )
    image_size: int | None = Field(None, ge=1, description="set by a cascade's diffusion decoder (its image_size)")
    learn_sigma: bool | None = Field(
        None,
        description="set by the diffusion decoder for a learned-range variance; channels_out must then be twice "
        "channels (the Decoder's learned_variance)",
    )


class UnetAdapter(nn.Module):
    """DALLE2-pytorch's ``Unet`` as a genzoo denoiser: ``cond['emb']`` -> image_embed (the first stage),
    ``cond['context']`` -> text_encodings, ``cond['low_res']`` resized (nearest) to x_t's size -> lowres_cond_img, as
    ``Decoder.sample`` resizes the stage before's image. ``drop`` / ``drop_emb`` drop the image embedding, ``drop`` /
    ``drop_context`` the caption (the Unet's own nulls); a missing caption is the null caption."""

    def __init__(self, *, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        cond, m = cond or {}, self.model
        low = None
        if m.lowres_cond:
            if cond.get("low_res") is None:
                raise ValueError("network 'dalle2-pytorch-unet' with lowres_cond needs cond['low_res']")
            low = F.interpolate(cond["low_res"].to(x.dtype), size=tuple(x.shape[-2:]), mode="nearest")
        emb, image_drop = cond.get("emb"), either(cond.get("drop"), cond.get("drop_emb"))
        if m.cond_on_image_embeds and emb is None:
            raise ValueError("network 'dalle2-pytorch-unet' with cond_on_image_embeds needs cond['emb'] (z_i)")
        encodings = None
        if m.cond_on_text_encodings:  # all-zero encodings are padding: the Unet's null text throughout
            encodings = masked_context(cond, x.dtype)
            encodings = x.new_zeros((len(x), 1, m.text_embed_dim)) if encodings is None else encodings

        def run(index: Tensor | None, text_p: float, image_p: float) -> Tensor:
            pick = _pick(index)
            return m(
                pick(x),
                pick(t),
                image_embed=pick(None if emb is None else emb.to(x.dtype)),
                text_encodings=pick(encodings),
                lowres_cond_img=pick(low),
                text_cond_drop_prob=text_p,
                image_cond_drop_prob=image_p,
            )

        return by_drop(run, len(x), either(cond.get("drop"), cond.get("drop_context")), image_drop)


@component("network", "dalle2-pytorch-unet", config=UnetConfig)
def build_unet(cfg: UnetConfig) -> UnetAdapter:
    """DALLE2-pytorch's Unet (the unCLIP decoder and its upsamplers) behind genzoo's denoiser interface."""
    from dalle2_pytorch.dalle2_pytorch import Unet

    where = "network 'dalle2-pytorch-unet': field 'unet."
    for field, why in (
        ("self_cond", "self-conditioning feeds the previous x0_hat back to the network"),
        ("lowres_noise_cond", "Imagen's noise conditioning noises the low-resolution image while sampling"),
    ):
        if cfg.unet.get(field):
            raise RegistryError(f"{where}{field}' is true: {why}, which genzoo's samplers do not do")
    try:
        model = Unet(**cfg.unet)
    except TypeError as e:
        raise RegistryError(f"network 'dalle2-pytorch-unet': field 'unet': {e}") from e
    doubled = model.channels_out == 2 * model.channels
    if cfg.learn_sigma is not None and cfg.learn_sigma != doubled:
        raise RegistryError(
            f"{where}channels_out' is {model.channels_out} for {model.channels} channels but learn_sigma is "
            f"{cfg.learn_sigma}: a learned variance needs twice the channels"
        )
    return UnetAdapter(model=model)


# --------------------------------------------------------------------------- the prior


class PriorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedding_dim: int = Field(
        ..., ge=1, description="the CLIP image embedding's size (DiffusionPrior.image_embed_dim)"
    )
    diffusion: dict[str, Any] = spec_field(
        "decoder",
        ...,
        "the diffusion decoder over the scaled embedding: {type: diffusion-decoder, <process>, denoiser: "
        "{type: dalle2-pytorch-prior-network, ...}}",
    )
    image_embed_scale: float | None = Field(
        None, gt=0, description="z_i is diffused times this (DiffusionPrior.image_embed_scale); null: sqrt(d)"
    )
    best_of: int = Field(2, ge=1, description="draws per caption, the one most similar to z_t kept (prior_num_samples)")
    init_l2norm: bool = Field(False, description="x_T scaled to norm image_embed_scale (init_image_embed_l2norm)")
    final_l2norm: bool = Field(
        False, description="the draw normalised to unit length (sampling_final_clamp_l2norm with x0 prediction)"
    )


class DiffusionPrior(Prior):
    """DALLE2-pytorch's ``DiffusionPrior``: the shared diffusion decoder over ``image_embed_scale`` z_i whose denoiser
    is the ``dalle2-pytorch-prior-network`` adapter; ``sample`` is ``DiffusionPrior.sample`` (best of ``best_of`` by
    cosine with z_t)."""

    condition_key = "emb"  # the decoder's condition, not its latent (interfaces.check_composition)
    needs_condition = TEXT_KEYS
    sampler_kind = SamplerKind.DIFFUSION
    stats_fitted = True  # no statistics to fit: the scale is fixed

    def __init__(self, *, diffusion_decoder: nn.Module, cfg: PriorConfig) -> None:
        super().__init__()
        self.diffusion_decoder, self.dim, self.best_of = diffusion_decoder, cfg.embedding_dim, cfg.best_of
        self.scale = cfg.image_embed_scale or math.sqrt(cfg.embedding_dim)
        self.init_l2norm, self.final_l2norm = cfg.init_l2norm, cfg.final_l2norm
        self.produces = Spec(shape=(cfg.embedding_dim,))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        clip = components.get("clip")
        if clip is not None and int(clip.embed_dim) != self.dim:
            raise RegistryError(
                f"{where}prior 'dalle2-pytorch-prior': embedding_dim is {self.dim} but the CLIP's embeddings have "
                f"{clip.embed_dim} dims; the prior models the CLIP it was trained with"
            )

    def fit(self, z: Tensor) -> None:
        """Nothing to fit."""

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        if sampler is None:
            raise GenzooError(
                "prior 'dalle2-pytorch-prior' needs a diffusion sampler: add `prior_sampler: {type: ddpm}`"
            )
        k = self.best_of if condition and "text_emb" in condition else 1
        if k > 1:  # each caption k times in a row, as DiffusionPrior.sample repeats its text
            condition = {key: v.repeat_interleave(k, 0) if torch.is_tensor(v) else v for key, v in condition.items()}
        where = generator.device if generator is not None else self.device
        x_t = torch.randn((n * k, self.dim), generator=generator, device=where).to(self.device)
        if self.init_l2norm:
            x_t = F.normalize(x_t, dim=-1) * self.scale
        z = self.diffusion_decoder.decode(x_t, condition, generator=generator, sampler=sampler, guidance=guidance)
        z = (F.normalize(z, dim=-1) if self.final_l2norm else z / self.scale).float()
        if k == 1:
            return z
        z = z.view(n, k, -1)
        score = (F.normalize(z, dim=-1) * F.normalize(condition["text_emb"].float().view(n, k, -1), dim=-1)).sum(-1)
        return z[torch.arange(n, device=z.device), score.argmax(1)]

    def training_losses(self, z: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        """The inner decoder's loss on ``image_embed_scale`` z (DiffusionPrior.forward)."""
        return self.diffusion_decoder.training_losses(z.float() * self.scale, condition)


@component("prior", "dalle2-pytorch-prior", config=PriorConfig)
def make_prior(cfg: PriorConfig, ctx: Any) -> DiffusionPrior:
    """DALLE2-pytorch's DiffusionPrior: its prior network diffusing scaled CLIP image embeddings."""
    inner = build_embedding_diffusion(ctx, cfg.diffusion, cfg.embedding_dim, where="prior 'dalle2-pytorch-prior': ")
    return DiffusionPrior(diffusion_decoder=inner, cfg=cfg)
