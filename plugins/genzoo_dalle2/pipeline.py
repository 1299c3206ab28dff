"""DALL·E 2 / unCLIP (Ramesh et al. 2022): ``P(x | y) = P(x | z_i, y) P(z_i | y)`` (Eq. 1).

The recipe's ``clip`` gives the caption's CLIP embedding z_t and token outputs (the ``clip-text``
encoder) and the image embedding z_i; a prior (``diffusion-prior`` or ``ar-prior``) draws z_i from
the caption; the decoder is the shared diffusion decoder whose U-Net takes z_i as a projection added
to the time embedding and as 4 extra context tokens beside the caption's (Sec. 2.1); a cascade of
upsamplers finishes it (``upsampler_decoder``, then ``upsampler2_decoder``, ...: the paper's 64 -> 256 ->
1024). Each stage's sampler and guidance are separate roles (``prior_sampler``/``prior_guidance``,
``sampler``/``guidance``, ``upsampler_sampler``/``upsampler_guidance``, ``upsampler2_sampler``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.decoder import DiffusionPipeline, check_denoiser
from genzoo.diffusion.editing import ddim_invert, inversion_sampler
from genzoo.diffusion.samplers import randn
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import CompositionError, describe_component
from genzoo.pipelines import Conditioning
from genzoo.registry import component
from genzoo.text.clip import TEXT_KEYS, clip_losses


def slerp(a: Tensor, b: Tensor, w: Tensor) -> Tensor:
    """Spherical interpolation between unit vectors ``a`` and ``b`` (D,) at weights ``w`` (N,) -> (N, D)
    (Shoemake 1985; unCLIP Sec. 3.2 interpolates z_i this way)."""
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    w = w.float().view(-1, 1)
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


def text_diff_embeddings(z_i: Tensor, z_t0: Tensor, z_t: Tensor, theta: Tensor) -> Tensor:
    """unCLIP Sec. 3.3's text diffs: z_theta = slerp(z_i, z_d, theta) with z_d = norm(z_t - z_t0), the normalised
    difference of the target caption's CLIP text embedding ``z_t`` and the current one's ``z_t0``; ``theta`` (N,)
    -> (N, D), at z_i's norm (1 for a unit-norm CLIP)."""
    diff = z_t.float() - z_t0.float()
    if float(diff.norm()) < 1e-6:
        raise GenzooError("text diff: the two captions have the same CLIP embedding; give captions that differ")
    return slerp(z_i, F.normalize(diff, dim=-1), theta) * z_i.float().norm()


UPSAMPLER_ROLE = re.compile(r"(upsampler(\d*))_decoder")


def cascade_stages(components: Mapping[str, Any]) -> tuple[str, ...]:
    """The recipe's upsampler stages in order: ``upsampler`` (roles ``upsampler_decoder``, ``upsampler_sampler``,
    ``upsampler_guidance``), then ``upsampler2`` (``upsampler2_decoder``, ...) and so on."""
    found = {
        int(m.group(2) or 1): m.group(1)
        for role, comp in components.items()
        if comp is not None and (m := UPSAMPLER_ROLE.fullmatch(role))
    }
    stages = tuple(found[k] for k in sorted(found))
    want = tuple("upsampler" if k == 1 else f"upsampler{k}" for k in range(1, len(found) + 1))
    if stages != want:
        raise RegistryError(
            f"pipeline 'dalle2': upsampler roles {[f'{s}_decoder' for s in stages]} must be numbered in order "
            f"without gaps: {[f'{s}_decoder' for s in want]}"
        )
    return stages


class UnCLIPConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    fit_images: int = Field(
        10000,
        ge=2,
        description="training images whose CLIP embeddings fix the prior's statistics (standardisation, PCA)",
    )
    upsampler_crop: float = Field(
        1.0,
        gt=0,
        le=1,
        description="each upsampler trains on random crops of this fraction of its image side (and the matching "
        "low-res crop) and samples at full size: unCLIP trains its convolution-only upsamplers on crops a "
        "quarter of the target size (Sec. 2.1); 1: whole images",
    )


class UnCLIPPipeline(DiffusionPipeline):
    """Stages in order: ``clip`` (unless the CLIP is pretrained), ``prior``, ``decoder``, ``upsampler``.

    The prior and the decoder train on the frozen CLIP's embeddings of the same batch; the decoder
    drops z_i 10% and the caption 50% of the time, independently (its ``emb_drop`` / ``context_drop``).
    ``sample`` takes a caption (text to image), an ``image`` (variations: z_i from CLIP, decoded
    again) or an ``emb`` (e.g. a slerp of two, :meth:`interpolate`; a text diff, :meth:`text_diff`).
    The upsamplers (``cascade``) train one stage each, on the training images brought down to their own
    size (random crops of ``upsampler_crop`` of its side), conditioned on the images brought down to the size of
    the stage before.
    """

    def __init__(self, components: Mapping[str, Any], *, fit_images: int, upsampler_crop: float = 1.0) -> None:
        super().__init__(components, condition=Conditioning.caption, num_classes=None)
        self.fit_images, self.upsampler_crop = fit_images, upsampler_crop
        clip = components["clip"]
        self.cascade = cascade_stages(components)
        self.stages = (() if clip.pretrained else ("clip",)) + ("prior", "decoder") + self.cascade

    def stage_size(self, stage: str) -> int:
        """The image side that ``stage`` (``decoder`` or an upsampler stage) draws."""
        return self.components[stage if stage == "decoder" else f"{stage}_decoder"].produces.shape[-1]

    @property
    def image_size(self) -> int:
        return self.stage_size(("decoder", *self.cascade)[-1])

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
        role = f"{stage}_decoder" if stage in self.cascade else stage
        return {"main": [p for p in self.components[role].parameters() if p.requires_grad]}

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "prior"
    ) -> dict[str, Tensor]:
        x, captions = batch["image"], batch["caption"]
        if stage == "clip":
            return clip_losses(self.clip, x, {"tokens": self.components["encoder"].tokenize(captions)})
        if stage in self.cascade:  # x0 at the stage's size, conditioned on x0 at the size of the stage before
            before = ("decoder", *self.cascade)[self.cascade.index(stage)]
            size = self.stage_size(stage)
            x0, low = resize(x, size), resize(x, self.stage_size(before))
            if self.upsampler_crop < 1:
                x0, low = random_crops(x0, low, crop_side(self.upsampler_crop, size))
            return self.components[f"{stage}_decoder"].training_losses(x0, {"low_res": low})
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
        x_T: Tensor | None = None,
        sampler: Any = None,
    ) -> Tensor:
        """Images from image embeddings (and the caption's tokens, when given): the decoder, then the upsamplers;
        ``shared_noise``: one x_T for every image (and one per upsampler); ``x_T`` and ``sampler``: the decoder's
        starting point and sampler instead of fresh noise and the recipe's."""
        c, n = self.components, len(z_i)

        def noise(shape: tuple[int, ...]) -> Tensor:
            x_t = randn(
                (1 if shared_noise else n, *shape), None, generator=generator, device=self.device, dtype=torch.float32
            )
            return x_t.expand(n, *shape) if shared_noise else x_t

        # the caption's z_t too, for decoders that read it (Karlo's text projection; genzoo's U-Net ignores it),
        # and what the guidance reads besides (CLIP guidance: the caption's tokens)
        guidance = c.get("guidance")
        keys = TEXT_KEYS | set(getattr(guidance, "needs_condition", ()))
        cond = {"emb": z_i.float(), **{k: v for k, v in (text or {}).items() if k in keys}}
        x = c["decoder"].decode(
            noise(c["decoder"].produces.shape) if x_T is None else x_T,
            cond,
            generator=generator,
            sampler=sampler if sampler is not None else c.get("sampler"),
            guidance=guidance,
        )
        return self.upsample(x, generator=generator, noise=noise)

    @torch.no_grad()
    def invert(self, images: Tensor, z_i: Tensor, *, iters: int = 0) -> tuple[Tensor, Any]:
        """The base decoder's x_T whose DDIM chain (eta 0), conditioned on ``z_i``, ends at ``images`` brought down to
        its size: unCLIP's bipartite latent (z_i, x_T) (Sec. 3.1), by genzoo.diffusion.editing's DDIM inversion on
        the decoder sampler's grid (``iters`` fixed-point refinements per step), the recipe's guidance included.
        Returns x_T and the DDIM sampler that decodes it back."""
        c, dec = self.components, self.components["decoder"]
        sampler = inversion_sampler(c["sampler"])
        x_T = ddim_invert(
            sampler,
            dec.diffusion,
            dec.denoiser,
            resize(images.to(self.device).float(), self.base_size),
            top=sampler.respaced(dec.diffusion).num_timesteps - 1,
            cond={"emb": z_i.float()},
            guidance=c.get("guidance"),
            iters=iters,
        )
        return x_T, sampler

    @torch.no_grad()
    def upsample(self, low: Tensor, *, generator: torch.Generator | None = None, noise: Any = None) -> Tensor:
        """The upsamplers alone, each in turn, from base-size images in [-1, 1]; ``noise(shape)`` draws each stage's
        x_T (default: fresh normal noise from ``generator``)."""
        c, x = self.components, low
        for stage in self.cascade:
            dec = c[f"{stage}_decoder"]
            shape = dec.produces.shape
            x_t = noise(shape) if noise is not None else randn((len(x), *shape), x, generator=generator)
            x = dec.decode(
                x_t,
                {"low_res": x.clamp(-1, 1)},
                generator=generator,
                sampler=c.get(f"{stage}_sampler"),
                guidance=c.get(f"{stage}_guidance"),
            )
        return x

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
    def text_diff(
        self,
        image: Tensor,
        source: str,
        target: str,
        steps: int,
        *,
        theta: float = 0.5,
        invert: bool = True,
        invert_iters: int = 0,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """``steps`` images of ``image`` (C, H, W) edited toward caption ``target`` (unCLIP Sec. 3.3): its z_i rotated
        toward z_d = norm(z_t(target) - z_t(source)) by slerp at theta = 0 .. ``theta`` (the paper goes up to
        0.25-0.5), every frame decoded from the same x_T. ``source`` describes the image as it is.

        ``invert`` (the paper's way): x_T is the DDIM inversion of the image under the decoder conditioned on its z_i
        (:meth:`invert`), every frame decoded from it by DDIM (eta 0), so theta = 0 gives back the image (at the
        decoder's size, up to the inversion's error); the upsamplers share one x_T, though an ancestral upsampler (the
        recipes') still draws each frame's step noise apart (``upsampler_sampler=ddim``: frames differ by z alone). Else
        every frame draws the same noise (x_T and each ancestral step's, from one seed taken from ``generator``) with
        the recipe's sampler: theta = 0 is then a variation of the image."""
        if steps < 1:
            raise GenzooError(f"text diff: {steps} frames; ask for at least 1 (-n)")
        z_i = self.image_embeddings(image[None].to(self.device))[0]
        z_t = self.components["encoder"].encode({"caption": [source, target]})["text_emb"].to(z_i)
        z = text_diff_embeddings(z_i, z_t[0], z_t[1], torch.linspace(0, theta, steps, device=z_i.device))
        if invert:
            x_T, sampler = self.invert(image[None], z_i[None], iters=invert_iters)
            return self.decode_embeddings(
                z, generator=generator, shared_noise=True, x_T=x_T.expand(steps, *x_T.shape[1:]), sampler=sampler
            ).clamp(-1, 1)  # the inversion's DDIM does not clamp x0_hat (a clamped step is not invertible)
        where = generator.device if generator is not None else torch.device("cpu")
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=where))
        return torch.cat(
            [
                self.decode_embeddings(z[k : k + 1], generator=torch.Generator(device=where).manual_seed(seed))
                for k in range(steps)
            ]
        )

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


@component("pipeline", "dalle2", config=UnCLIPConfig)
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
    check_cascade(comps, ctx.data.image_shape[-1] if ctx.data is not None else None, cfg.upsampler_crop)
    return UnCLIPPipeline(comps, fit_images=cfg.fit_images, upsampler_crop=cfg.upsampler_crop)


def check_cascade(comps: Mapping[str, Any], data_size: int | None, crop: float = 1.0) -> None:
    """Each upsampler has its sampler (of its kind, its guidance of the sampler's kind) and draws larger images than
    the stage before; the last draws the dataset's size; training crops fit the low-res grid and the U-Net."""
    before, size = "decoder", comps["decoder"].produces.shape[-1]
    for stage in cascade_stages(comps):
        dec, sampler, guidance = (comps.get(f"{stage}_{kind}") for kind in ("decoder", "sampler", "guidance"))
        if sampler is None:
            raise RegistryError(
                f"pipeline 'dalle2': {stage}_decoder needs a {stage}_sampler (e.g. {{type: ddim, steps: 25}})"
            )
        for user, what in ((dec, f"{stage}_decoder"), (guidance, f"{stage}_guidance")):
            want = getattr(user, "sampler_kind", getattr(user, "kind", None))
            if user is not None and want is not None and want != sampler.kind:
                raise CompositionError(
                    f"{describe_component(what, user)} works with a {want.value} sampler but "
                    f"{describe_component(f'{stage}_sampler', sampler)} is a {sampler.kind.value} sampler; "
                    f"pick a {want.value} one"
                )
        if dec.produces.shape[-1] <= size:
            raise RegistryError(
                f"pipeline 'dalle2': {stage}_decoder draws {dec.produces.shape[-1]} px, not more than {before}'s "
                f"{size} px; set {stage}_decoder.image_size larger (each upsampler enlarges the stage before)"
            )
        if crop < 1:
            side, factor = crop_side(crop, dec.produces.shape[-1]), dec.produces.shape[-1] / size
            halvings = len(getattr(getattr(dec.denoiser, "cfg", None), "channel_mult", [1])) - 1
            if factor != int(factor) or side % (int(factor) * 2**halvings):
                raise RegistryError(
                    f"pipeline 'dalle2': upsampler_crop {crop} crops {stage}_decoder's {dec.produces.shape[-1]} px "
                    f"images to {side} px, which must be a multiple of {factor:g} (its upscaling factor) x "
                    f"{2**halvings} (its U-Net's halvings); pick a crop fraction that gives one"
                )
        before, size = f"{stage}_decoder", dec.produces.shape[-1]
    if data_size is not None and before != "decoder" and size != data_size:
        raise RegistryError(
            f"pipeline 'dalle2': the last upsampler, {before}, draws {size} px but the dataset's images are "
            f"{data_size} px; set {before}.image_size to {data_size} (or leave it unset)"
        )


def crop_side(fraction: float, size: int) -> int:
    return max(1, round(fraction * size))


def random_crops(x: Tensor, low: Tensor, side: int) -> tuple[Tensor, Tensor]:
    """A random ``side`` x ``side`` crop of each image of ``x`` and the same region of its low-res ``low`` (whose
    side divides x's): the offsets are drawn on the low-res grid, one per image, from torch's generator."""
    factor = x.shape[-1] // low.shape[-1]
    k = side // factor
    offset = torch.randint(0, low.shape[-1] - k + 1, (len(x), 2), device=x.device)

    def crop(images: Tensor, at: Tensor, n: int) -> Tensor:
        r = torch.arange(n, device=images.device)
        rows, cols = (at[:, 0, None] + r)[:, :, None], (at[:, 1, None] + r)[:, None, :]
        batch = torch.arange(len(images), device=images.device)[:, None, None]
        return images.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)

    return crop(x, offset * factor, side), crop(low, offset, k)


def resize(images: Tensor, size: int) -> Tensor:
    """Images area-downsampled to side ``size`` (unchanged when they have it)."""
    return images if images.shape[-1] == size else F.interpolate(images, size=size, mode="area")
