"""unCLIP from diffusers (Karlo, kakaobrain/karlo-v1-alpha): the pieces genzoo's ``dalle2`` pipeline needs, and the
importer of ``UnCLIPPipeline``.

* ``diffusers-clip`` (kind ``clip``): transformers' ``CLIPTextModelWithProjection`` (and, when the folder has one,
  ``CLIPVisionModelWithProjection``) with its ``CLIPTokenizer`` behind genzoo's CLIP interface (``tokenize``,
  ``encode_text_sequence``, ``encode_image``), so dalle2's ``clip-text`` encoder reads captions with it.
* ``diffusers-unclip-prior`` (kind ``prior``): a diffusion decoder over the (normalised) CLIP image embedding whose
  denoiser is the ``diffusers-prior-transformer`` adapter; a sample is ``post_process_latents`` of its output, not
  normalised to unit length (Karlo's decoder takes the raw embedding).

``import_unclip`` maps ``UnCLIPPipeline`` onto ``dalle2``: prior + text projection + decoder + one super-resolution
stage whose last step is served by ``super_res_last`` (the diffusion decoder's ``last_step_denoiser``), each
``UnCLIPScheduler`` onto genzoo's process and ancestral sampler, and the pipeline's guidance scales onto ``cfg``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Prior, SamplerKind, Spec
from genzoo.priors import build_embedding_diffusion
from genzoo.registry import component, spec_field
from genzoo.text.clip import TEXT_KEYS

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)  # CLIPImageProcessor's defaults
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


# --------------------------------------------------------------------------- CLIP


class TransformersClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text_config: dict[str, Any] = Field(
        ..., description="transformers' CLIPTextConfig of the text tower (CLIPTextModelWithProjection)"
    )
    vision_config: dict[str, Any] | None = Field(
        None,
        description="CLIPVisionConfig of the image tower (CLIPVisionModelWithProjection); null: text only, as "
        "UnCLIPPipeline ships it (no image embeddings, so no variations)",
    )
    tokenizer: str = Field(..., description="a folder holding the CLIPTokenizer's files (JSON / txt)")
    image_mean: tuple[float, float, float] = Field(OPENAI_MEAN, description="the image processor's image_mean")
    image_std: tuple[float, float, float] = Field(OPENAI_STD, description="the image processor's image_std")
    normalize: bool = Field(
        True,
        description="unit-norm embeddings (genzoo's CLIP contract); false: the raw projections, which diffusers' "
        "unCLIP prior produces and its decoder reads",
    )


class TransformersCLIP(nn.Module):
    """transformers' CLIP towers behind genzoo's CLIP interface. Images in [-1, 1] are resized (bicubic,
    antialiased) to the vision tower's size and normalised with the processor's mean and std; captions are
    tokenized to the tokenizer's ``model_max_length`` with padding, as diffusers' unCLIP pipelines do."""

    noised = False
    pretrained = True  # genzoo does not train it

    def __init__(
        self, *, text: nn.Module, tokenizer: Any, vision: nn.Module | None, cfg: TransformersClipConfig
    ) -> None:
        super().__init__()
        self.text, self.tokenizer, self.normalize = text, tokenizer, cfg.normalize
        if vision is not None:
            self.vision = vision
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("logit_scale", torch.tensor(100.0).log(), persistent=False)  # CLIP's final temperature

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def embed_dim(self) -> int:
        return int(self.text.config.projection_dim)

    @property
    def text_width(self) -> int:
        return int(self.text.config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.tokenizer.model_max_length)

    def _out(self, z: Tensor) -> Tensor:
        z = _fp32_or_more(z)
        return F.normalize(z, dim=-1) if self.normalize else z

    def tokenize(self, captions: list[str]) -> Tensor:
        ids = self.tokenizer(
            list(captions), padding="max_length", max_length=self.context_length, truncation=True, return_tensors="pt"
        ).input_ids
        return ids.to(self.device)

    def encode_text_sequence(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(text embedding z_t, last hidden states (B, L, width), mask (B, L)): the mask is the tokenizer's
        attention mask, every position up to and including the first end-of-text token."""
        tokens = tokens.to(self.device)
        out = self.text(input_ids=tokens)
        eos = tokens == self.tokenizer.eos_token_id
        last = torch.where(eos.any(1), eos.int().argmax(1), tokens.shape[1] - 1)
        mask = torch.arange(tokens.shape[1], device=tokens.device) <= last[:, None]
        return self._out(out.text_embeds), _fp32_or_more(out.last_hidden_state), mask

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return self._out(self.text(input_ids=tokens.to(self.device)).text_embeds)

    def encode_text(self, captions: list[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(captions))

    def encode_image(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        vision = getattr(self, "vision", None)
        if vision is None:
            raise GenzooError(
                "this CLIP has no image tower (UnCLIPPipeline ships only the text encoder), so it cannot embed "
                "images: variations and interpolation need one; import a folder that also holds image_encoder/ "
                "and feature_extractor/ (UnCLIPImageVariationPipeline's, e.g. kakaobrain/karlo-v1-alpha-image-"
                "variations)"
            )
        size = int(vision.config.image_size)
        x = (x.float() + 1) / 2
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        return self._out(vision(pixel_values=(x - self.mean) / self.std).image_embeds)


@component("clip", "diffusers-clip", config=TransformersClipConfig)
def build_transformers_clip(cfg: TransformersClipConfig, ctx: Any = None) -> TransformersCLIP:
    """transformers' CLIP text (and image) towers with their tokenizer (Karlo's CLIP ViT-L/14) as a genzoo CLIP."""
    import transformers

    folder = Path(cfg.tokenizer).expanduser()
    if not folder.is_dir():
        raise RegistryError(
            f"clip 'diffusers-clip': field 'tokenizer': {folder} is not a folder of tokenizer files; `genzoo import` "
            "writes one into the run directory (RUN/tokenizer)"
        )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder))
    text = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**_public(cfg.text_config)))
    vision = None
    if cfg.vision_config is not None:
        vision = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**_public(cfg.vision_config)))
    return TransformersCLIP(text=text.eval(), tokenizer=tokenizer, vision=vision and vision.eval(), cfg=cfg)


def _fp32_or_more(x: Tensor) -> Tensor:
    """float32 out of autocast's half types; a float64 model (an exactness check) stays float64."""
    return x if x.dtype == torch.float64 else x.float()


def _public(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in config.items() if not k.startswith("_")}


# --------------------------------------------------------------------------- the prior


class UnCLIPPriorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embedding_dim: int = Field(..., ge=1, description="size of the CLIP image embedding (the prior's embedding_dim)")
    diffusion: dict[str, Any] = spec_field(
        "decoder",
        ...,
        "the diffusion decoder over the normalised embedding: {type: diffusion-decoder, <process>, "
        "denoiser: {type: diffusers-prior-transformer, ...}}",
    )


class UnCLIPPrior(Prior):
    """diffusers' unCLIP prior (Karlo): the shared diffusion decoder over the normalised CLIP image embedding, its
    denoiser the ``PriorTransformer`` (x0-prediction from the caption's z_t and token states). A sample is
    ``post_process_latents`` (z std + mean) of the decoded embedding, left unnormalised as diffusers leaves it."""

    condition_key = "emb"  # the decoder's condition, not its latent (interfaces.check_composition)
    needs_condition = TEXT_KEYS
    sampler_kind = SamplerKind.DIFFUSION
    stats_fitted = True  # its statistics are the PriorTransformer's clip_mean / clip_std

    def __init__(self, *, diffusion_decoder: nn.Module, dim: int) -> None:
        super().__init__()
        self.diffusion_decoder, self.dim = diffusion_decoder, dim
        self.produces = Spec(shape=(dim,))

    @property
    def denoiser(self) -> nn.Module:
        return self.diffusion_decoder.denoiser

    @property
    def diffusion(self) -> Any:
        return self.diffusion_decoder.diffusion

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def fit(self, z: Tensor) -> None:
        """Nothing to fit: the prior carries its own statistics."""

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        if sampler is None:
            raise GenzooError(
                "prior 'diffusers-unclip-prior' needs a diffusion sampler: add `prior_sampler: {type: ddpm}`"
            )
        device = self.device
        where = generator.device if generator is not None else device
        noise = torch.randn((n, self.dim), generator=generator, device=where)
        z = self.diffusion_decoder.decode(
            noise.to(device), condition, generator=generator, sampler=sampler, guidance=guidance
        )
        return self.denoiser.unnormalize(z)

    def training_losses(self, z: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        """The inner decoder's loss on the normalised embeddings ``z``."""
        return self.diffusion_decoder.training_losses(self.denoiser.normalize(z.float()), condition)


@component("prior", "diffusers-unclip-prior", config=UnCLIPPriorConfig)
def make_unclip_prior(cfg: UnCLIPPriorConfig, ctx: Any) -> UnCLIPPrior:
    """diffusers' unCLIP prior (Karlo): a PriorTransformer diffusion over CLIP image embeddings."""
    where = "prior 'diffusers-unclip-prior': "
    inner = build_embedding_diffusion(ctx, cfg.diffusion, cfg.embedding_dim, where=where)
    if not callable(getattr(inner.denoiser, "unnormalize", None)):
        raise RegistryError(f"{where}field 'diffusion': its denoiser must be {{type: diffusers-prior-transformer}}")
    return UnCLIPPrior(diffusion_decoder=inner, dim=cfg.embedding_dim)


# --------------------------------------------------------------------------- the importer


def _cls(index: Mapping[str, Any], name: str) -> str | None:
    entry = index.get(name)
    return entry[1] if isinstance(entry, list) and len(entry) == 2 else None


def import_unclip(
    folder: Path, index: Mapping[str, Any], source: str, out: Path, data: Mapping[str, Any] | None
) -> tuple[dict[str, Any], Any, list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """UnCLIPPipeline at ``folder`` as a dalle2 recipe body, its data spec, the states to load (``role.attr`` ->
    state dict) and what meta.json records. Writes the tokenizer's files to ``out/tokenizer``."""
    import transformers
    from diffusers.pipelines.deprecated.unclip.text_proj import UnCLIPTextProjModel

    from genzoo.data import DataSpec

    from .adapters import ModuleConfig, build_module, module_config
    from .importer import UNCLIP_MODULES, UNCLIP_SCALES, UNCLIP_STEPS, default_data
    from .loading import from_pretrained, read_config, require_safetensors
    from .scheduler import map_unclip_scheduler

    for name, want in UNCLIP_MODULES.items():
        if _cls(index, name) != want:
            raise GenzooError(f"{folder}: UnCLIPPipeline's {name} is a {_cls(index, name)}; genzoo imports a {want}")
    for name in ("prior", "decoder", "text_proj", "text_encoder", "super_res_first", "super_res_last"):
        require_safetensors(folder / name)
    stages = {}
    for stage in ("prior", "decoder", "super_res"):
        raw = read_config(folder / f"{stage}_scheduler", "scheduler_config.json")
        stages[stage] = map_unclip_scheduler(raw, steps=UNCLIP_STEPS[stage])

    def load(cls_name: str, sub: str) -> nn.Module:
        return build_module(cls_name, ModuleConfig(pretrained=str(folder), subfolder=sub)).eval()

    prior, decoder, first, last = (
        load("PriorTransformer", "prior"),
        load("UNet2DConditionModel", "decoder"),
        load("UNet2DModel", "super_res_first"),
        load("UNet2DModel", "super_res_last"),
    )
    text_proj = from_pretrained(UnCLIPTextProjModel, str(folder), subfolder="text_proj").eval()
    text_encoder = _at_least_fp32(
        from_pretrained(transformers.CLIPTextModelWithProjection, str(folder), subfolder="text_encoder")
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    vision, processor = None, {}
    if (folder / "image_encoder" / "config.json").exists():  # UnCLIPImageVariationPipeline's, copied in by the user
        require_safetensors(folder / "image_encoder")
        vision = _at_least_fp32(
            from_pretrained(transformers.CLIPVisionModelWithProjection, str(folder), subfolder="image_encoder")
        )
        if (folder / "feature_extractor" / "preprocessor_config.json").exists():
            pre = read_config(folder / "feature_extractor", "preprocessor_config.json")
            processor = {k: tuple(pre[k]) for k in ("image_mean", "image_std") if k in pre}

    c_dec, c_first, c_last = decoder.config, first.config, last.config
    channels, base, size = int(c_dec.in_channels), int(c_dec.sample_size), int(c_first.sample_size)
    for name, c in (("super_res_first", c_first), ("super_res_last", c_last)):
        if int(c.in_channels) != 2 * channels or int(c.out_channels) != channels or int(c.sample_size) != size:
            raise GenzooError(
                f"{folder}: {name} takes {c.in_channels} channels at {c.sample_size} and gives {c.out_channels}; "
                f"UnCLIPPipeline's super-resolution takes the {channels}-channel image and its upsampled decoder "
                f"output ({2 * channels}) at {size}"
            )
    dim, length = int(prior.config.embedding_dim), int(tokenizer.model_max_length)
    if int(text_encoder.config.projection_dim) != dim or int(text_proj.config.clip_embeddings_dim) != dim:
        raise GenzooError(
            f"{folder}: the text encoder projects to {text_encoder.config.projection_dim}, the prior models "
            f"{dim} and the text projection reads {text_proj.config.clip_embeddings_dim}: they must agree"
        )
    with torch.no_grad():  # the null caption: the empty prompt, as UnCLIPPipeline encodes it for CFG
        ids = tokenizer([""], padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        enc = text_encoder(input_ids=ids.input_ids)
    null = {
        "null_caption.text_emb": enc.text_embeds[0],
        "null_caption.context": enc.last_hidden_state[0],
        "null_caption.context_mask": ids.attention_mask[0].bool(),
    }

    tok_dir = out / "tokenizer"  # the run keeps its own copy of the tokenizer's files (JSON / txt, never a pickle)
    tok_dir.mkdir(parents=True, exist_ok=True)
    for f in (folder / "tokenizer").iterdir():
        if f.is_file() and f.suffix in (".json", ".txt"):
            shutil.copyfile(f, tok_dir / f.name)

    (prior_fields, prior_sampler), (dec_fields, dec_sampler), (sr_fields, sr_sampler) = (
        stages["prior"],
        stages["decoder"],
        stages["super_res"],
    )
    clip = {
        "type": "diffusers-clip",
        "text_config": _json(text_encoder.config.to_dict()),
        "tokenizer": str(tok_dir.resolve()),
        "normalize": False,
        **({"vision_config": _json(vision.config.to_dict()), **processor} if vision is not None else {}),
    }
    components = {
        "clip": clip,
        "encoder": {"type": "clip-text"},
        "prior": {
            "type": "diffusers-unclip-prior",
            "embedding_dim": dim,
            "diffusion": {
                "type": "diffusion-decoder",
                **prior_fields,
                "denoiser": {
                    "type": "diffusers-prior-transformer",
                    "config": module_config(prior),
                    "null_caption_length": length,
                },
            },
        },
        "prior_sampler": prior_sampler,
        "prior_guidance": {"type": "cfg", "scale": UNCLIP_SCALES["prior"]},
        "decoder": {
            "type": "diffusion-decoder",
            **dec_fields,
            "image_size": base,
            "denoiser": {
                "type": "diffusers-unet2d-condition",
                "config": module_config(decoder),
                "text_proj": module_config(text_proj),
                "null_caption_length": length,
            },
        },
        "sampler": dec_sampler,
        "guidance": {"type": "cfg", "scale": UNCLIP_SCALES["decoder"]},
        "upsampler_decoder": {
            "type": "diffusion-decoder",
            **sr_fields,
            "denoiser": {"type": "diffusers-unet2d", "config": module_config(first), "low_res": True},
            "last_step_denoiser": {"type": "diffusers-unet2d", "config": module_config(last), "low_res": True},
        },
        "upsampler_sampler": sr_sampler,
    }
    body = {
        "description": f"UnCLIPPipeline {source} imported from diffusers: prior, decoder and super-resolution behind "
        "the diffusers adapters in genzoo's dalle2 pipeline",
        "pipeline": {"type": "dalle2"},
        "data": dict(data) if data else default_data(source, channels, size, out),
        "components": components,
        "sample": {"n": 4},
    }
    states = [
        ("clip.text", text_encoder.state_dict()),
        ("prior.diffusion_decoder.denoiser", {**{f"model.{k}": v for k, v in prior.state_dict().items()}, **null}),
        (
            "decoder.denoiser",
            {
                **{f"model.{k}": v for k, v in decoder.state_dict().items()},
                **{f"text_proj.{k}": v for k, v in text_proj.state_dict().items()},
                **null,
            },
        ),
        ("upsampler_decoder.denoiser", {f"model.{k}": v for k, v in first.state_dict().items()}),
        ("upsampler_decoder.last_denoiser", {f"model.{k}": v for k, v in last.state_dict().items()}),
    ]
    if vision is not None:
        states.append(("clip.vision", vision.state_dict()))
    spec = DataSpec(name="imported", image_shape=(channels, size, size), has_captions=True)
    extra = {
        "scheduler": "UnCLIPScheduler",
        "unet": "adapter",
        "adapter_reason": "unCLIP's networks have no native genzoo counterpart",
        "image_encoder": vision is not None,
        "steps": dict(UNCLIP_STEPS),
        "guidance_scales": dict(UNCLIP_SCALES),
        "transformers": transformers.__version__,
    }
    return body, spec, states, extra


def _at_least_fp32(module: nn.Module) -> nn.Module:
    """A half-precision module (an fp16 variant) in float32 for the import's own forward passes, in eval mode."""
    half = any(p.dtype in (torch.float16, torch.bfloat16) for p in module.parameters())
    return (module.float() if half else module).eval()


def _json(config: Mapping[str, Any]) -> dict[str, Any]:
    """A transformers config dict as plain JSON values (tuples become lists; dtypes their names)."""
    return json.loads(json.dumps(_public(config), default=str))
