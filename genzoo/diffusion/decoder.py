"""A diffusion model as components: the decoder (denoiser + Gaussian process) and its pipeline.

DDPM (Ho et al. 2020), Improved DDPM (Nichol & Dhariwal 2021), ADM (Dhariwal & Nichol 2021),
GLIDE and the unCLIP decoder are all this decoder with a different schedule, parameterisation,
loss, denoiser and condition; the pipeline adds the family's training objective.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from genzoo.diffusion.editing import MaskConditioned, inpaint_input, mask_channels_spec, random_known
from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, LossType, ModelMeanType, ModelVarType
from genzoo.diffusion.guidance import noised_clip_losses
from genzoo.diffusion.samplers import randn
from genzoo.diffusion.schedules import betas_with_float32_abar, get_named_beta_schedule
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Decoder, SamplerKind, Spec
from genzoo.pipelines import Conditioning, LabelledPipeline, labelled_args
from genzoo.registry import component, spec_field


class DiffusionDecoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: str = Field("linear", description="beta schedule: linear (Ho et al.) or cosine (Nichol & Dhariwal)")
    timesteps: int = Field(1000, ge=1, description="T, the number of diffusion steps in training")
    betas: list[float] | None = Field(
        None,
        description="explicit b_1..b_T, used instead of the named schedule (an imported model's schedule that "
        "genzoo does not name); T entries in (0, 1]",
    )
    abar_float32: bool = Field(
        False,
        description="abar as the float32 cumulative product of float32 alphas, as diffusers' schedulers compute "
        "it (imported models then sample as diffusers does); False: float64",
    )
    mean_type: ModelMeanType = Field(ModelMeanType.EPSILON, description="what the denoiser predicts: eps, x0 or v")
    var_type: ModelVarType = Field(
        ModelVarType.FIXED_LARGE, description="reverse variance: fixed-small, fixed-large or learned-range"
    )
    loss: LossType = Field(LossType.SIMPLE, description="L_simple, L_hybrid (simple + 0.001 L_vlb) or L_vlb")
    timestep_sampler: str = Field("uniform", description="how t is drawn in training: uniform or loss-aware (L_vlb)")
    clip_range: float | None = Field(
        1.0, description="clamp predicted x0 to [-c, c] when sampling; null for unbounded data"
    )
    cond_drop: float = Field(0.0, ge=0, le=1, description="probability of dropping the condition in training (for CFG)")
    emb_drop: float = Field(
        0.0, ge=0, le=1, description="probability of dropping only cond['emb'] (unCLIP's CLIP embedding: 0.1)"
    )
    context_drop: float = Field(
        0.0,
        ge=0,
        le=1,
        description="probability of dropping only the caption tokens, independently of emb_drop (unCLIP: 0.5)",
    )
    image_size: int | None = Field(
        None, ge=1, description="image side it draws; None: the dataset's (a cascade's base model is smaller)"
    )
    low_res_blur: tuple[float, float] | None = Field(
        None,
        description="upsamplers: in training, blur cond['low_res'] with a Gaussian whose std (pixels of the "
        "low-res image) is "
        "drawn per image uniformly from [lo, hi], so that it learns to sharpen a base model's soft output "
        "(unCLIP Sec. 2.1)",
    )
    denoiser: dict[str, Any] = spec_field(
        "network", {"type": "unet"}, "the network: {type: unet | mlp-denoiser | ..., fields}"
    )
    inpaint: bool = Field(
        False,
        description="GLIDE's inpainting model (Nichol et al. 2022, Sec. 4): the denoiser also takes the known pixels "
        "and the mask as C + 1 extra input channels (cond['inpaint']), trained on random rectangles to fill; "
        "`genzoo edit --mask` fills a mask with it (docs/editing.md)",
    )
    last_step_denoiser: dict[str, Any] | None = spec_field(
        "network",
        None,
        "a second network that replaces the denoiser at the sampler's last model evaluation (Karlo's "
        "super_res_last, unCLIP Sec. 2.1's upsamplers); training trains `denoiser` only. null: the "
        "denoiser throughout",
    )

    @model_validator(mode="after")
    def _check(self) -> DiffusionDecoderConfig:
        if self.betas is not None and (len(self.betas) != self.timesteps or not all(0 < b <= 1 for b in self.betas)):
            raise ValueError(f"betas must hold timesteps={self.timesteps} values in (0, 1], got {len(self.betas)}")
        if self.low_res_blur is not None and not 0 <= self.low_res_blur[0] <= self.low_res_blur[1]:
            raise ValueError(f"low_res_blur {list(self.low_res_blur)} must be [lo, hi] with 0 <= lo <= hi")
        if (
            self.var_type is ModelVarType.LEARNED_RANGE and self.loss is LossType.SIMPLE
        ):  # L_simple gives the variance no gradient
            raise ValueError(
                "var_type learned-range trains its variance only through L_vlb; set loss: hybrid (Improved DDPM) "
                "or vlb, or var_type: fixed-small/fixed-large"
            )
        return self


def gaussian_blur(x: Tensor, sigma: Tensor, *, radius: int) -> Tensor:
    """Blur each image of ``x`` (B, C, H, W) with an isotropic Gaussian of its own std ``sigma`` (B,), in pixels:
    one separable depthwise convolution, the kernel cut at ``radius`` and renormalised, edges replicated."""
    b, c, h, w = x.shape
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(offsets[None] ** 2) / (2 * sigma.to(x.dtype)[:, None].clamp(min=1e-3) ** 2))  # std 0: a delta
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B * C, 2r + 1)
    y = F.pad(x.reshape(1, b * c, h, w), (radius,) * 4, mode="replicate")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)  # along the width
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)  # along the height
    return y.view(b, c, h, w)


class LastStepDenoiser(nn.Module):
    """``denoiser`` everywhere but at the original timestep ``t_last``, where ``last`` predicts instead (per sample)."""

    def __init__(self, denoiser: nn.Module, last: nn.Module, t_last: int) -> None:
        super().__init__()
        self.denoiser, self.last, self.t_last = denoiser, last, t_last

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        at_last = t == self.t_last
        if bool(at_last.all()):
            return self.last(x, t, cond)
        if not bool(at_last.any()):
            return self.denoiser(x, t, cond)
        return torch.where(at_last.view(-1, *([1] * (x.dim() - 1))), self.last(x, t, cond), self.denoiser(x, t, cond))


def final_timestep(sampler: Any, diffusion: GaussianDiffusion) -> int:
    """The original timestep of ``sampler``'s last model evaluation on ``diffusion``: its grid point ``last_index``."""
    respaced = getattr(sampler, "respaced", None)
    if respaced is None:
        raise RegistryError(
            f"a last_step_denoiser needs a sampler with a timestep grid (ddpm, ddim, ...); "
            f"{type(sampler).__name__} has none"
        )
    return int(respaced(diffusion).timestep_map[getattr(sampler, "last_index", 0)])


class DiffusionDecoder(Decoder):
    """Draws x_0 from x_T ~ N(0, I) by running a sampler over ``diffusion`` and ``denoiser`` (and, with a
    ``last_denoiser``, that network at the sampler's last model evaluation)."""

    sampler_kind = SamplerKind.DIFFUSION

    def __init__(
        self,
        *,
        denoiser: nn.Module,
        diffusion: GaussianDiffusion,
        shape: tuple[int, ...],
        cond_drop: float,
        timestep_sampler: Any,
        needs_condition: frozenset[str] = frozenset(),
        emb_drop: float = 0.0,
        context_drop: float = 0.0,
        low_res_blur: tuple[float, float] | None = None,
        last_denoiser: nn.Module | None = None,
        inpaint: bool = False,
    ) -> None:
        super().__init__()
        self.low_res_blur, self.inpaint = low_res_blur, inpaint
        self.denoiser = denoiser
        if last_denoiser is not None:  # registered only when there is one: existing checkpoints keep their keys
            self.last_denoiser = last_denoiser
        self.diffusion = diffusion
        self.drops = {"drop": cond_drop, "drop_emb": emb_drop, "drop_context": context_drop}
        self.timestep_sampler = timestep_sampler
        self.consumes = Spec(shape=shape)
        self.produces = Spec(shape=shape)
        self.needs_condition = needs_condition

    def decode(
        self, z: Tensor, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None
    ) -> Tensor:
        if sampler is None:
            raise RegistryError(
                f"{type(self).__name__} needs a diffusion sampler; add `sampler: {{type: ddim}}` to the recipe"
            )
        net = self.denoiser
        last = getattr(self, "last_denoiser", None)
        if last is not None:
            net = LastStepDenoiser(net, last, final_timestep(sampler, self.diffusion))
        return sampler.sample(
            self.diffusion,
            net,
            tuple(z.shape),
            cond=condition,
            guidance=guidance,
            generator=generator,
            noise=z,
            device=z.device,
        )

    def training_losses(self, x0: Tensor, cond: Condition | None = None) -> dict[str, Tensor]:
        """The per-batch diffusion loss at a t drawn by the timestep sampler (importance weights applied)."""
        t, weights = self.timestep_sampler.sample(x0.shape[0], x0.device)
        if self.low_res_blur is not None and cond and "low_res" in cond:
            lo, hi = self.low_res_blur
            sigma = lo + (hi - lo) * torch.rand(x0.shape[0], device=x0.device)
            cond = {**cond, "low_res": gaussian_blur(cond["low_res"], sigma, radius=max(1, math.ceil(3 * hi)))}
        if self.inpaint:  # GLIDE Sec. 4: random regions erased, the rest and the mask as input channels
            cond = {**(cond or {}), "inpaint": inpaint_input(x0, random_known(x0))}
        if (
            cond
        ):  # classifier-free guidance's null-condition dropout (Ho & Salimans 2021), each mask drawn independently
            cond = {
                **cond,
                **{k: torch.rand(x0.shape[0], device=x0.device) < p for k, p in self.drops.items() if p > 0},
            }
        terms = self.diffusion.training_losses(self.denoiser, x0, t, cond=cond)
        if hasattr(self.timestep_sampler, "update_with_local_losses") and "vlb" in terms:
            self.timestep_sampler.update_with_local_losses(t, terms["vlb"].detach())
        out = {k: (v * weights).mean() if v.dim() else v for k, v in terms.items()}
        return out


@component("decoder", "diffusion-decoder", config=DiffusionDecoderConfig)
def make_diffusion_decoder(cfg: DiffusionDecoderConfig, ctx) -> DiffusionDecoder:
    """A denoiser network with its Gaussian diffusion process (schedule, mean and variance type, loss)."""
    from genzoo.diffusion.gaussian_diffusion import create_timestep_sampler

    if cfg.abar_float32:
        betas = betas_with_float32_abar(cfg.schedule, cfg.timesteps, cfg.betas)
    else:
        betas = (
            get_named_beta_schedule(cfg.schedule, cfg.timesteps)
            if cfg.betas is None
            else np.asarray(cfg.betas, dtype=np.float64)
        )
    diffusion = GaussianDiffusion(
        betas=betas,
        model_mean_type=cfg.mean_type,
        model_var_type=cfg.var_type,
        loss_type=cfg.loss,
        clip_range=cfg.clip_range,
    )
    learn_sigma = cfg.var_type is ModelVarType.LEARNED_RANGE
    if ctx.data is None:
        raise RegistryError("decoder 'diffusion-decoder' needs a dataset to size its denoiser")
    spec = dict(cfg.denoiser)
    shape = tuple(ctx.data.image_shape)
    if cfg.image_size is not None:
        shape = (shape[0], cfg.image_size, cfg.image_size)
        # a resolved spec holds image_size: None (not absent), and a network sized for the dataset would place
        # its attention_resolutions at the wrong levels (issue 22: glide-shapes attended only at 4x4, not 8x8)
        if spec.get("image_size") is None:
            spec["image_size"] = cfg.image_size
    if spec.get("learn_sigma") is not None and spec["learn_sigma"] != learn_sigma:
        raise RegistryError(
            f"decoder 'diffusion-decoder': denoiser.learn_sigma is {spec['learn_sigma']} but var_type is "
            f"{cfg.var_type.value}; leave learn_sigma unset (null) and the var_type decides"
        )
    if learn_sigma:  # the variance interpolation v of Improved DDPM Eq. 15 is the denoiser's second half
        spec["learn_sigma"] = True
    where = "decoder 'diffusion-decoder': "

    def network(spec: dict[str, Any], role: str) -> nn.Module:
        if cfg.inpaint:  # the known image and the mask are extra input channels (GLIDE Sec. 4)
            spec = mask_channels_spec(spec, shape[0], shape[0] * (2 if learn_sigma else 1), f"{where}{role}: ")
        net = ctx.registry.build("network", spec, data=ctx.data, where=f"{where}{role}: ")
        return MaskConditioned(net) if cfg.inpaint else net

    denoiser = network(spec, "denoiser")
    last = None
    if cfg.last_step_denoiser is not None:
        last_spec = dict(cfg.last_step_denoiser)
        if cfg.image_size is not None and last_spec.get("image_size") is None:
            last_spec["image_size"] = cfg.image_size
        if learn_sigma:
            last_spec["learn_sigma"] = True
        last = network(last_spec, "last_step_denoiser")
    return DiffusionDecoder(
        denoiser=denoiser,
        diffusion=diffusion,
        shape=shape,
        cond_drop=cfg.cond_drop,
        emb_drop=cfg.emb_drop,
        context_drop=cfg.context_drop,
        timestep_sampler=create_timestep_sampler(cfg.timestep_sampler, diffusion),
        low_res_blur=cfg.low_res_blur,
        last_denoiser=last,
        inpaint=cfg.inpaint,
    )


# --------------------------------------------------------------------------- pipeline


class DiffusionPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(
        Conditioning.none, description="none; class (the dataset's label is y); caption (through the text encoder)"
    )
    upsampler_condition: bool = Field(
        False,
        description="a cascade's upsampler also reads the condition (the class y, the encoded caption), as "
        "guided-diffusion's class-conditional and GLIDE's text-conditional upsamplers do; false: the low-resolution "
        "image alone (unCLIP's, Karlo's)",
    )
    quantize_low_res: bool = Field(
        False,
        description="round the base's samples to 8-bit levels before the upsampler reads them, as OpenAI's scripts "
        "do (GLIDE's notebook rounds them, guided-diffusion's super_res_sample reads saved images)",
    )


class DiffusionPipeline(LabelledPipeline):
    """Trains the denoiser (with the text encoder, for captions), then an upsampler, then a trainable guidance.

    Stages, in order and only those that apply: ``decoder``; ``upsampler`` when the recipe has an
    ``upsampler_decoder`` (a cascade: the base draws at its own smaller size, the upsampler brings
    the image to the dataset's size from the bilinearly upsampled low-resolution image, GLIDE Sec. 2.3);
    ``clip`` when the recipe has a ``clip`` (GLIDE's noised CLIP, which any CLIP guidance swapped in uses;
    first of all when the caption encoder reads it, e.g. ``clip-text``, a frozen pretrained text encoder);
    ``guidance`` when the guidance has weights (ADM's noisy classifier, GLIDE's noised CLIP), trained
    on inputs noised by the decoder's own process, so its t means the same (Dhariwal & Nichol 2021, Sec. 4).
    """

    def __init__(
        self,
        components: Mapping[str, Any],
        *,
        condition: Conditioning,
        num_classes: int | None,
        upsampler_condition: bool = False,
        quantize_low_res: bool = False,
    ) -> None:
        super().__init__(components, condition=condition, num_classes=num_classes)
        self.upsampler_condition, self.quantize_low_res = upsampler_condition, quantize_low_res
        guidance = components.get("guidance")
        trainable_guidance = callable(getattr(guidance, "training_losses", None)) and any(
            True for _ in guidance.parameters()
        )
        self.base_size = components["decoder"].produces.shape[-1]
        clip = components.get("clip")
        # a caption encoder that reads the recipe's CLIP (`clip-text`: Imagen's frozen pretrained text encoder, here
        # the CLIP's text tower) needs that CLIP trained before the decoder learns to read it
        clip_first = clip is not None and getattr(components.get("encoder"), "clip", None) is clip
        self.stages = (
            (("clip",) if clip_first else ())
            + ("decoder",)
            + (("upsampler",) if self.upsampler is not None else ())
            + (("clip",) if clip is not None and not clip_first else ())
            + (("guidance",) if trainable_guidance else ())
        )

    @property
    def upsampler(self) -> DiffusionDecoder | None:
        return self.components.get("upsampler_decoder")

    def low_res(self, images: Tensor) -> Tensor:
        """The base model's view of full-size images: area-downsampled to its size."""
        return images if images.shape[-1] == self.base_size else F.interpolate(images, size=self.base_size, mode="area")

    def optimizer_groups(self, stage: str = "decoder") -> dict[str, list[nn.Parameter]]:
        modules = {
            "decoder": [self.components["decoder"], self.components.get("encoder")],
            "upsampler": [self.upsampler],
            "clip": [self.components.get("clip")],
            "guidance": [self.components.get("guidance")],
        }[stage]
        return {"main": [p for m in modules if isinstance(m, nn.Module) for p in m.parameters() if p.requires_grad]}

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "decoder"
    ) -> dict[str, Tensor]:
        x0 = batch["image"]
        if stage == "upsampler":
            with torch.no_grad():  # the caption's encoder trained with the base decoder; here it is read only
                cond = self.condition_of(batch) if self.upsampler_condition else None
            return self.upsampler.training_losses(x0, {**(cond or {}), "low_res": self.low_res(x0)})
        diffusion = self.components["decoder"].diffusion
        if stage == "clip":  # the recipe's CLIP, noised by the base decoder's process, for CLIP guidance
            return noised_clip_losses(
                self.components["clip"], self.low_res(x0), self.condition_of(batch, encode=False), diffusion
            )
        if stage == "guidance":
            return self.components["guidance"].training_losses(
                self.low_res(x0), self.condition_of(batch, encode=False), diffusion
            )
        return self.components["decoder"].training_losses(self.low_res(x0), self.condition_of(batch))

    @torch.no_grad()
    def upsample(
        self,
        low: Tensor,
        condition: Mapping[str, Any] | None = None,
        *,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
    ) -> Tensor:
        """The upsampler stage alone: full-size images from low-resolution ones in [-1, 1] (``noise``: its x_T);
        ``condition`` as ``sample`` takes it ({"y": ...}, {"caption": [...]}), read when ``upsampler_condition``."""
        cond = self.encode_condition(condition) if self.upsampler_condition else None
        return self._upsample(low, cond, generator=generator, noise=noise)

    def _upsample(
        self, low: Tensor, cond: Condition | None, *, generator: torch.Generator | None, noise: Tensor | None = None
    ) -> Tensor:
        c, size = low.shape[1], self.upsampler.produces.shape[-1]
        if noise is None:
            noise = randn((len(low), c, size, size), low, generator=generator)
        return self.upsampler.decode(
            noise,
            {**(cond or {}), "low_res": low},
            generator=generator,
            sampler=self.components.get("upsampler_sampler"),
            guidance=self.components.get("upsampler_guidance"),
        )

    @torch.no_grad()
    def nll_bpd(
        self, x: Tensor, batch: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Per image: the full variational bound -log p(x) <= L_T + sum_{t>1} L_{t-1} + L_0 in bits/dim (DDPM Eq. 5,
        Improved DDPM Sec. 2), through the process's ``calc_bpd_loop`` (T network evaluations); ``batch`` holds the
        labels or captions of a conditional model (the bound is then of p(x | y))."""
        if self.upsampler is not None:
            raise GenzooError(
                "metric 'nll': a cascade's likelihood needs its upsampler's bound as well, which genzoo does not "
                "compute; evaluate nll on a single-stage diffusion model"
            )
        decoder = self.components["decoder"]
        out = decoder.diffusion.calc_bpd_loop(
            decoder.denoiser, x, cond=self.condition_of(batch or {}), generator=generator
        )
        return {"vlb_bpd": out["total_bpd"], "prior_bpd": out["prior_bpd"], "decoder_bpd": out["vb"][:, 0]}

    @torch.no_grad()
    def sample(
        self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        cond = self.encode_condition(self.sample_condition(n, condition))  # once, for the base and the upsampler
        x = self.sample_encoded(n, cond, generator=generator)
        if self.upsampler is None:
            return x
        low = x.clamp(-1, 1)
        if self.quantize_low_res:
            low = ((low + 1) * 127.5).round() / 127.5 - 1
        return self._upsample(low, cond if self.upsampler_condition else None, generator=generator)


def check_denoiser(
    pipeline: str,
    components: Mapping[str, Any],
    want: Mapping[str, int | None],
    source: str,
    *,
    role: str = "decoder",
) -> None:
    """The ``role``'s denoiser has the condition widths its conditioner gives (``want``: field -> width, None for an
    input it must not have), and a cascade's upsampler has its sampler; errors name the field and the value to set."""
    cfg = getattr(getattr(components.get(role), "denoiser", None), "cfg", None)
    for field, value in want.items():
        got = getattr(
            cfg, field, "n/a" if value is not None else None
        )  # a denoiser without the field has no such input
        if cfg is not None and got != value:
            shown = "null" if value is None else value
            raise RegistryError(
                f"pipeline '{pipeline}': {role}.denoiser.{field} is {got} but {source} needs {shown}; set "
                f"{field}: {shown}"
            )
    if components.get("upsampler_decoder") is not None and components.get("upsampler_sampler") is None:
        raise RegistryError(
            f"pipeline '{pipeline}': an upsampler_decoder needs an upsampler_sampler (e.g. {{type: ddim, steps: 25}})"
        )


@component("pipeline", "diffusion", config=DiffusionPipelineConfig)
def make_diffusion_pipeline(cfg: DiffusionPipelineConfig, ctx) -> DiffusionPipeline:
    """DDPM / Improved DDPM / ADM / GLIDE: a diffusion decoder (+ upsampler), unconditional, class- or
    caption-conditional."""
    args = labelled_args("diffusion", cfg.condition, ctx)
    encoder = ctx.components.get("encoder")
    want, source = {}, "the text encoder"
    if cfg.condition is Conditioning.caption:  # an encoder names its widths: one `width`, or each of its outputs'
        width = getattr(encoder, "width", None)
        want = {
            "context_dim": getattr(encoder, "context_width", width),
            "emb_dim_in": getattr(encoder, "emb_width", width),
        }
        want = {k: v for k, v in want.items() if v is not None}
        gives = getattr(getattr(encoder, "produces", None), "condition", frozenset())
        if "context" in gives and "emb" not in gives:
            # a U-Net with a pooled path would silently see only its learned null there (a denoiser that encodes
            # text itself, e.g. OpenAI's GLIDE, is fed no context and is not concerned)
            want["emb_dim_in"] = None
            source = "a text encoder that gives no pooled 'emb' (clip-text: set encoder.pooled_as_emb: true)"
    if cfg.upsampler_condition and (
        cfg.condition is Conditioning.none or ctx.components.get("upsampler_decoder") is None
    ):
        raise RegistryError(
            "pipeline 'diffusion': field 'upsampler_condition' is true but there is "
            + (
                "no condition to read; set condition: class or caption"
                if cfg.condition is Conditioning.none
                else "no upsampler_decoder; drop upsampler_condition"
            )
        )
    check_denoiser("diffusion", ctx.components, want, source)
    if cfg.upsampler_condition:  # the upsampler reads what the base reads (a class model: its classes)
        if cfg.condition is Conditioning.class_:
            want, source = {"num_classes": args["num_classes"]}, "the dataset's classes"
        check_denoiser("diffusion", ctx.components, want, source, role="upsampler_decoder")
    return DiffusionPipeline(
        ctx.components, **args, upsampler_condition=cfg.upsampler_condition, quantize_low_res=cfg.quantize_low_res
    )
