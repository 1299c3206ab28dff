"""DALL·E 2 / unCLIP (Ramesh et al. 2022): ``P(x | y) = P(x | z_i, y) P(z_i | y)`` (Eq. 1).

The recipe's ``clip`` gives the caption's CLIP embedding z_t and token outputs (the ``clip-text``
encoder) and the image embedding z_i; a prior (``diffusion-prior`` or ``ar-prior``) draws z_i from
the caption; the decoder is the shared diffusion decoder whose U-Net takes z_i as a projection added
to the time embedding and as 4 extra context tokens beside the caption's (Sec. 2.1); an upsampler
finishes the cascade, as GLIDE's. Each stage's sampler and guidance are separate roles
(``prior_sampler``/``prior_guidance``, ``sampler``/``guidance``, ``upsampler_sampler``).
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.decoder import DiffusionPipeline, check_denoiser
from genzoo.diffusion.samplers import randn
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Encoder, Spec
from genzoo.pipelines import Conditioning
from genzoo.text.clip import clip_losses

from .prior import TEXT_KEYS


def slerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (D,) at weights ``w`` (N,) -> (N, D)
    (Shoemake 1985; unCLIP Sec. 3.2 interpolates z_i this way)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    w = w.float().view(-1, 1)
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


class ClipTextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClipTextEncoder(Encoder):
    """Captions through the recipe's (frozen) CLIP text tower: ``text_emb`` (z_t), ``context`` +
    ``context_mask`` (its per-token outputs) and ``tokens``. It borrows the CLIP (``bind_siblings``),
    so the CLIP's weights are saved once, under ``clip``."""

    def __init__(self, cfg: ClipTextEncoderConfig | None = None) -> None:
        super().__init__()
        self.__dict__["clip"] = None
        self.produces = Spec(condition=TEXT_KEYS | {"tokens"})

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        clip = components.get("clip")
        if clip is None:
            raise RegistryError(
                f"{where}encoder 'clip-text' reads captions with the recipe's CLIP: add components.clip"
            )
        self.__dict__["clip"] = clip
        self.produces = Spec(shape=(clip.embed_dim,), condition=TEXT_KEYS | {"tokens"})

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.clip.tokenize(list(captions))

    @torch.no_grad()
    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            tokens = self.tokenize(condition["caption"])
            z_t, seq, mask = self.clip.encode_text_sequence(tokens)
            out.update(text_emb=z_t, context=seq.float(), context_mask=mask, tokens=tokens)
        return out


class UnCLIPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fit_images: int = Field(
        10000,
        ge=2,
        description="training images whose CLIP embeddings fix the prior's statistics (standardisation, PCA)",
    )


class UnCLIPPipeline(DiffusionPipeline):
    """Stages in order: ``clip`` (unless the CLIP is pretrained), ``prior``, ``decoder``, ``upsampler``.

    The prior and the decoder train on the frozen CLIP's embeddings of the same batch; the decoder
    drops z_i 10% and the caption 50% of the time, independently (its ``emb_drop`` / ``context_drop``).
    ``sample`` takes a caption (text to image), an ``image`` (variations: z_i from CLIP, decoded
    again) or an ``emb`` (e.g. a slerp of two, :meth:`interpolate`).
    """

    def __init__(self, components: Mapping[str, Any], *, fit_images: int) -> None:
        super().__init__(components, condition=Conditioning.caption, num_classes=None)
        self.fit_images = fit_images
        clip = components["clip"]
        self.stages = (
            (() if clip.pretrained else ("clip",))
            + ("prior", "decoder")
            + (("upsampler",) if self.upsampler is not None else ())
        )

    @property
    def image_size(self) -> int:
        return (self.upsampler or self.components["decoder"]).produces.shape[-1]

    @contextmanager
    def frozen_clip(self):
        """The CLIP in eval mode (a BatchNorm tower must not update its statistics after its stage), no gradients."""
        was = self.clip.training
        self.clip.eval()
        try:
            with torch.no_grad():
                yield self.clip
        finally:
            self.clip.train(was)

    def image_embeddings(self, images: Tensor, *, batch: int = 500) -> Tensor:
        """Unit-norm CLIP embeddings z_i of full-size images in [-1, 1], in fp32 (as at sampling)."""
        with self.frozen_clip() as clip, torch.autocast(self.device.type, enabled=False):
            return torch.cat(
                [clip.encode_image(images[i : i + batch].to(self.device).float()) for i in range(0, len(images), batch)]
            )

    def ready_to_sample(self) -> bool:
        return bool(getattr(self.components["prior"], "stats_fitted", True))

    def begin_stage(self, stage: str, data: Mapping[str, Any]) -> None:
        """Before the prior's first step: its standardisation (and PCA) from the frozen CLIP's embeddings of
        ``fit_images`` training images. Statistics already there (a prior taken over with --init-from) stay."""
        prior = self.components["prior"]
        if stage == "prior" and not bool(prior.stats_fitted):
            prior.fit(self.image_embeddings(data["image"][: self.fit_images]))

    def optimizer_groups(self, stage: str = "prior") -> dict[str, list[nn.Parameter]]:
        role = {"clip": "clip", "prior": "prior", "decoder": "decoder", "upsampler": "upsampler_decoder"}[stage]
        return {"main": [p for p in self.components[role].parameters() if p.requires_grad]}

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "prior"
    ) -> dict[str, Tensor]:
        x, captions = batch["image"], batch["caption"]
        if stage == "clip":
            return clip_losses(self.clip, x, {"tokens": self.components["encoder"].tokenize(captions)})
        if stage == "upsampler":
            return super().training_losses(batch, optimizer=optimizer, stage=stage)
        with self.frozen_clip(), torch.autocast(self.device.type, enabled=False):
            text = self.components["encoder"].encode({"caption": captions})
        z_i = self.image_embeddings(x)
        if stage == "prior":
            return self.components["prior"].training_losses(z_i, text)
        return self.components["decoder"].training_losses(
            self.low_res(x), {"emb": z_i, "context": text["context"], "context_mask": text["context_mask"]}
        )

    @torch.no_grad()
    def sample(
        self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        c, condition = self.components, dict(condition or {})
        if "y" in condition:
            raise GenzooError("DALL·E 2 is conditioned on captions, not classes; pass --prompt TEXT instead of --class")
        text = c["encoder"].encode({"caption": condition["caption"]}) if "caption" in condition else {}
        if "image" in condition:  # variations: the image's own z_i, decoded again
            z_i = self.image_embeddings(condition["image"])
        elif "emb" in condition:
            z_i = condition["emb"].to(self.device)
        else:
            z_i = c["prior"].sample(
                n, text or None, generator=generator, sampler=c.get("prior_sampler"), guidance=c.get("prior_guidance")
            )
        return self.decode_embeddings(z_i, text, generator=generator)

    @torch.no_grad()
    def decode_embeddings(
        self,
        z_i: Tensor,
        text: Mapping[str, Tensor] | None = None,
        *,
        generator: torch.Generator | None = None,
        shared_noise: bool = False,
    ) -> Tensor:
        """Images from image embeddings (and the caption's tokens, when given): the decoder, then the upsampler;
        ``shared_noise``: one x_T for every image (and one for the upsampler)."""
        c, n = self.components, len(z_i)

        def noise(shape: tuple[int, ...]) -> Tensor:
            x_t = randn(
                (1 if shared_noise else n, *shape), None, generator=generator, device=self.device, dtype=torch.float32
            )
            return x_t.expand(n, *shape) if shared_noise else x_t

        # the caption's z_t too, for decoders that read it (Karlo's text projection); genzoo's U-Net ignores it
        cond = {
            "emb": z_i.float(),
            **{k: text[k] for k in ("text_emb", "context", "context_mask") if text and k in text},
        }
        x = c["decoder"].decode(
            noise(c["decoder"].produces.shape),
            cond,
            generator=generator,
            sampler=c.get("sampler"),
            guidance=c.get("guidance"),
        )
        if self.upsampler is None:
            return x
        return self.upsample(x.clamp(-1, 1), generator=generator, noise=noise(self.upsampler.produces.shape))

    @torch.no_grad()
    def variations(self, images: Tensor, k: int = 1, *, generator: torch.Generator | None = None) -> Tensor:
        """``k`` variations of each image (unCLIP Sec. 3.1), grouped by image: (len(images) * k, C, H, W)."""
        return self.sample(len(images) * k, {"image": images.repeat_interleave(k, 0)}, generator=generator)

    @torch.no_grad()
    def interpolate(self, a: Tensor, b: Tensor, steps: int, *, generator: torch.Generator | None = None) -> Tensor:
        """``steps`` images along the slerp from image ``a``'s z_i to ``b``'s (Sec. 3.2). Every frame starts from the
        same decoder and upsampler noise, so with deterministic samplers (DDIM, eta 0) only z_i changes along the
        path."""
        z = self.image_embeddings(torch.stack([a, b]))
        w = torch.linspace(0, 1, steps, device=z.device)
        norm = (1 - w) * z[0].norm() + w * z[
            1
        ].norm()  # 1 for a unit-norm CLIP; an unnormalised one (Karlo's) keeps its scale
        z_path = slerp(z[0], z[1], w) * norm[:, None]
        return self.decode_embeddings(z_path, generator=generator, shared_noise=True)

    @torch.no_grad()
    def prior_cosine(
        self, images: Tensor, captions: list[str], *, generator: torch.Generator | None = None, batch: int = 250
    ) -> dict[str, float]:
        """Mean cosine of the prior's z_i to the true image's z_i for each (image, caption) pair, and of the
        baseline that uses z_t itself as the image embedding (unCLIP Sec. 5.1's comparison)."""
        c, prior_cos, text_cos = self.components, [], []
        for i in range(0, len(images), batch):
            text = c["encoder"].encode({"caption": list(captions[i : i + batch])})
            true = self.image_embeddings(images[i : i + batch])
            pred = c["prior"].sample(
                len(true), text, generator=generator, sampler=c.get("prior_sampler"), guidance=c.get("prior_guidance")
            )
            pred, true = (
                F.normalize(pred.float(), dim=-1),
                F.normalize(true.float(), dim=-1),
            )  # unit already, unless imported
            prior_cos.append((pred * true).sum(-1))
            text_cos.append((F.normalize(text["text_emb"].to(true), dim=-1) * true).sum(-1))
        return {"prior_cosine": float(torch.cat(prior_cos).mean()), "text_cosine": float(torch.cat(text_cos).mean())}


def make_unclip_pipeline(cfg: UnCLIPConfig, ctx: Any) -> UnCLIPPipeline:
    """DALL·E 2 / unCLIP (Ramesh et al. 2022): CLIP, a prior over CLIP image embeddings, a diffusion decoder and
    upsampler."""
    comps = ctx.components
    for role in ("clip", "encoder", "prior", "decoder"):
        if comps.get(role) is None:
            raise RegistryError(
                f"pipeline 'dalle2' needs components.{role} (clip, encoder: {{type: clip-text}}, a "
                "CLIP-embedding prior, "
                "a diffusion decoder)"
            )
    if ctx.data is not None and not ctx.data.has_captions:
        raise RegistryError(
            f"pipeline 'dalle2' trains on captions, and dataset '{ctx.data.name}' has none; use shapes or an "
            "imagefolder with captions"
        )
    if getattr(comps["prior"], "condition_key", None) != "emb":
        raise RegistryError(
            "pipeline 'dalle2': the prior must draw CLIP image embeddings: {type: diffusion-prior} or {type: ar-prior}"
        )
    check_denoiser(
        "dalle2", comps, {"emb_dim_in": comps["clip"].embed_dim, "context_dim": comps["clip"].text_width}, "the CLIP"
    )
    return UnCLIPPipeline(comps, fit_images=cfg.fit_images)
