"""CLIP (Radford et al. 2021): paired image and text encoders into one embedding space.

Two implementations behind one interface (``encode_image(x, t=None)``, ``encode_text(captions)``,
``encode_tokens(tokens)``, ``logit_scale``; embeddings unit-norm, images in [-1, 1]):

* ``clip``: trained by genzoo (symmetric cross-entropy over the in-batch similarity matrix with a
  learned temperature, Sec. 2.5 and Fig. 3). Its image tower is any registered network that maps an
  image to a vector: the ADM encoder (``noisy-classifier``), which takes ``t``, or a timm model.
  ``noised: true`` trains it on x_t at every t of a diffusion (GLIDE Sec. 2.4) for CLIP guidance.
* ``open-clip``: any open_clip architecture by name, with pretrained weights fetched by open_clip
  (huggingface_hub) or read from a local ``.safetensors`` file.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor, nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Encoder, Pipeline, Spec
from genzoo.registry import component, spec_field
from genzoo.text.transformer import TextTransformer, TextTransformerConfig


def contrastive_loss(image: Tensor, text: Tensor, logit_scale: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric InfoNCE over the batch (CLIP Fig. 3): pair i is the positive of row and column i.

    Returns the loss and the image-to-text top-1 accuracy.
    """
    logits = logit_scale.exp() * image.float() @ text.float().T
    labels = torch.arange(len(logits), device=logits.device)
    loss = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    return loss, (logits.argmax(-1) == labels).float().mean()


def clip_losses(
    clip: Any, images: Tensor, cond: Mapping[str, Tensor] | None, t: Tensor | None = None
) -> dict[str, Tensor]:
    """The contrastive loss of ``clip`` on images (at diffusion step ``t`` for a noised CLIP) and the
    caption ``tokens`` of ``cond``: how a recipe's own CLIP trains in its ``clip`` stage."""
    if not cond or "tokens" not in cond:
        raise ValueError("training a CLIP needs captions: set the pipeline's condition to 'caption'")
    clip.clamp_()
    loss, acc = contrastive_loss(clip.encode_image(images, t), clip.encode_tokens(cond["tokens"]), clip.logit_scale)
    return {"loss": loss, "accuracy": acc}


class ClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    embed_dim: int = Field(64, ge=2, description="dimension of the joint embedding space")
    image_tower: dict[str, Any] = spec_field(
        "network",
        {"type": "noisy-classifier", "channel_mult": [1, 2, 2], "attention_resolutions": []},
        "network from image to vector (its num_classes is set to embed_dim): noisy-classifier (takes t) or timm",
    )
    text_tower: TextTransformerConfig = Field(default_factory=TextTransformerConfig, description="the text transformer")
    noised: bool = Field(False, description="the image tower sees x_t and t (GLIDE's noised CLIP, for CLIP guidance)")
    init_temperature: float = Field(
        0.07, gt=0, description="initial softmax temperature (CLIP: 0.07); learned, floored at 0.01"
    )
    weights: str | None = Field(
        None,
        description="a genzoo run or checkpoint directory whose `clip` weights are loaded "
        "(e.g. runs/clip-shapes); the CLIP is then pretrained and a recipe does not train it again. "
        "A run trained with it holds its own copy: loading that run does not read this path",
    )

    @field_validator("weights")
    @classmethod
    def _absolute(
        cls, v: str | None
    ) -> str | None:  # a recipe resolved here still means the same run from another directory
        return None if v is None else str(Path(v).expanduser().resolve())


class CLIP(nn.Module):
    """genzoo's CLIP; see the module doc for the interface shared with :class:`OpenCLIP`."""

    def __init__(self, cfg: ClipConfig, image_tower: nn.Module) -> None:
        super().__init__()
        self.cfg, self.noised, self.pretrained = cfg, cfg.noised, cfg.weights is not None
        self.image_tower = image_tower
        self.takes_t = "t" in inspect.signature(image_tower.forward).parameters
        if cfg.noised and not self.takes_t:
            raise RegistryError(
                f"clip: field 'noised' is true but image_tower '{type(image_tower).__name__}' takes no t; "
                "use image_tower: {type: noisy-classifier}"
            )
        self.text = TextTransformer(cfg.text_tower)
        self.text_projection = nn.Linear(cfg.text_tower.width, cfg.embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / cfg.init_temperature)))

    @property
    def device(self) -> torch.device:
        return self.logit_scale.device

    def encode_image(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        """Unit-norm embeddings of images in [-1, 1]; ``t`` (noised CLIP) is the diffusion step of ``x``."""
        if self.takes_t:
            out = self.image_tower(x, t if t is not None and self.noised else torch.zeros(len(x), device=x.device))
        else:
            out = self.image_tower(x)
        return F.normalize(out.float(), dim=-1)

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def text_width(self) -> int:
        return self.cfg.text_tower.width

    @property
    def context_length(self) -> int:
        return self.cfg.text_tower.context

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.text.tokenize(list(captions)).to(self.device)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return self.encode_text_sequence(tokens)[0]

    def encode_text_sequence(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(unit-norm text embedding, per-token outputs (B, L, text_width), mask (B, L)): the pooled
        embedding is z_t, the tokens are what unCLIP's prior and decoder attend to."""
        pooled, seq, mask = self.text(tokens.to(self.device))
        return F.normalize(self.text_projection(pooled).float(), dim=-1), seq, mask

    def encode_text(self, captions: list[str]) -> Tensor:
        return self.encode_tokens(self.tokenize(captions))

    def clamp_(self) -> None:
        with torch.no_grad():  # CLIP clips the learned logit scale at 100 (temperature 0.01)
            self.logit_scale.clamp_(0, math.log(100))


@component("clip", "clip", config=ClipConfig)
def build_clip(cfg: ClipConfig, ctx: Any) -> CLIP:
    """A CLIP trained by genzoo: any image network (ADM encoder, which takes t; or timm) and the text transformer."""
    spec = dict(cfg.image_tower)
    if spec.get("num_classes") is None:  # the tower's head is the image projection
        spec["num_classes"] = cfg.embed_dim
    tower = ctx.registry.build("network", spec, data=ctx.data, where="clip: image_tower: ")
    clip = CLIP(cfg, tower)
    if cfg.weights is not None:
        from genzoo.checkpoint import has_checkpoint, load_checkpoint, load_state_into

        if not has_checkpoint(Path(cfg.weights).expanduser()):
            raise RegistryError(
                f"clip: field 'weights': {cfg.weights} is not a genzoo run or checkpoint directory; "
                "train one with `genzoo train clip-shapes --out DIR` and pass DIR"
            )
        ckpt = load_checkpoint(Path(cfg.weights).expanduser())
        if "clip" not in ckpt.components:
            raise RegistryError(
                f"clip: field 'weights': {ckpt.path} holds no 'clip' component (it has {sorted(ckpt.components)})"
            )
        load_state_into(clip, ckpt.components["clip"], role="clip", where=ckpt.path)
    return clip


# --------------------------------------------------------------------------- open_clip


class OpenClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field("ViT-B-32", description="an open_clip architecture (open_clip.list_models())")
    pretrained: str | None = Field(
        None, description="a pretrained tag (open_clip.list_pretrained()), downloaded through huggingface_hub"
    )
    checkpoint: str | None = Field(None, description="local .safetensors weights instead of a download (offline use)")


class OpenCLIP(nn.Module):
    """An open_clip model behind genzoo's CLIP interface: [-1, 1] images are resized and normalised
    with the model's own preprocessing statistics."""

    noised = False
    pretrained = True  # genzoo never trains an open_clip model

    def __init__(
        self, model: nn.Module, tokenizer: Any, *, image_size: int, mean: tuple[float, ...], std: tuple[float, ...]
    ) -> None:
        super().__init__()
        self.model, self.tokenizer, self.image_size = model, tokenizer, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.logit_scale = model.logit_scale

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def encode_image(self, x: Tensor, t: Tensor | None = None) -> Tensor:
        x = F.interpolate(
            (x.float() + 1) / 2, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False
        )
        return F.normalize(self.model.encode_image((x - self.mean) / self.std).float(), dim=-1)

    @property
    def embed_dim(self) -> int:
        return int(
            self.model.text_projection.shape[-1]
            if isinstance(self.model.text_projection, Tensor)
            else self.model.text_projection.out_features
        )

    @property
    def text_width(self) -> int:
        return int(self.model.transformer.width)

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", 77))

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.tokenizer(list(captions)).to(self.device)

    def _fit_length(self, tokens: Tensor) -> Tensor:
        length = getattr(self.tokenizer, "context_length", 77)
        return F.pad(tokens, (0, max(0, length - tokens.shape[1])))[:, :length].to(self.device)

    def encode_tokens(self, tokens: Tensor) -> Tensor:
        return F.normalize(self.model.encode_text(self._fit_length(tokens)).float(), dim=-1)

    def encode_text_sequence(self, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """As :meth:`CLIP.encode_text_sequence`, reading the per-token outputs of open_clip's text
        transformer (the steps of ``open_clip.CLIP.encode_text`` before pooling)."""
        m, tokens = self.model, self._fit_length(tokens)
        if not all(hasattr(m, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")):
            raise GenzooError(
                f"clip 'open-clip': {type(m).__name__} has no text transformer whose tokens genzoo can read; "
                "use an OpenAI-style CLIP architecture (e.g. ViT-B-32, RN50)"
            )
        cast = m.transformer.get_cast_dtype()
        x = (m.token_embedding(tokens) + m.positional_embedding).to(cast)
        batch_first = getattr(
            m.transformer, "batch_first", True
        )  # open_clip < 2.24 ran the text transformer sequence-first
        x = m.transformer(x if batch_first else x.transpose(0, 1), attn_mask=m.attn_mask)
        seq = m.ln_final(x if batch_first else x.transpose(0, 1)).float()
        eot = tokens.argmax(dim=-1)
        mask = torch.arange(tokens.shape[1], device=tokens.device) <= eot[:, None]
        return self.encode_tokens(tokens), seq, mask

    def encode_text(self, captions: list[str]) -> Tensor:
        return F.normalize(self.model.encode_text(self.tokenizer(list(captions)).to(self.device)).float(), dim=-1)


@component("clip", "open-clip", config=OpenClipConfig)
def build_open_clip(cfg: OpenClipConfig, ctx: Any = None) -> OpenCLIP:
    """open_clip's CLIP by model name, with pretrained weights when asked for (downloads through open_clip)."""
    import open_clip

    if cfg.model not in open_clip.list_models():
        near = [m for m in open_clip.list_models() if cfg.model.lower()[:4] in m.lower()][:8]
        raise RegistryError(
            f"clip 'open-clip': field 'model': '{cfg.model}' is not an open_clip architecture; "
            f"close ones: {near or open_clip.list_models()[:8]}"
        )
    if cfg.pretrained and cfg.checkpoint:
        raise RegistryError(
            "clip 'open-clip': set 'pretrained' (a tag to download) or 'checkpoint' (a local file), not both"
        )
    weights = cfg.pretrained
    if cfg.checkpoint:
        path = Path(cfg.checkpoint).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            raise RegistryError(
                f"clip 'open-clip': field 'checkpoint': {path} is not a .safetensors file; "
                "genzoo never unpickles weights: convert it with safetensors.torch.save_file"
            )
        weights = str(path)
    elif cfg.pretrained and cfg.pretrained not in open_clip.list_pretrained_tags_by_model(cfg.model):
        raise RegistryError(
            f"clip 'open-clip': field 'pretrained': '{cfg.pretrained}' is not a tag of {cfg.model}; "
            f"tags: {open_clip.list_pretrained_tags_by_model(cfg.model)}"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(cfg.model, pretrained=weights, weights_only=True)
    except (OSError, RuntimeError, ValueError) as e:
        if cfg.checkpoint:
            raise GenzooError(f"clip 'open-clip': could not load {weights} into {cfg.model}: {e}") from e
        raise GenzooError(
            f"clip 'open-clip': could not fetch pretrained weights '{cfg.pretrained}' for {cfg.model} "
            f"(no network?): {type(e).__name__}; download them where there is a network, or pass "
            "checkpoint: /path/to/open_clip_model.safetensors"
        ) from e
    model.eval()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
    std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
    return OpenCLIP(model, open_clip.get_tokenizer(cfg.model), image_size=size, mean=tuple(mean), std=tuple(std))


# --------------------------------------------------------------------------- training a CLIP


TEXT_KEYS = frozenset({"text_emb", "context", "context_mask"})
"""The condition keys a CLIP text tower gives: z_t, its per-token outputs and their padding mask."""


class ClipTextEncoderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pooled_as_emb: bool = Field(
        False,
        description="also give z_t as cond['emb'], the pooled embedding a GLIDE U-Net adds to its time embedding "
        "(set emb_dim_in to the CLIP's embed_dim); off for unCLIP, whose cond['emb'] is the image embedding z_i",
    )


@component("encoder", "clip-text", config=ClipTextEncoderConfig)
class ClipTextEncoder(Encoder):
    """Captions through the recipe's frozen CLIP text tower: ``text_emb`` (z_t), ``context`` + ``context_mask``
    (its per-token outputs) and ``tokens``; the text encoder of unCLIP (Ramesh et al. 2022, Sec. 2.1) and, as
    Imagen's frozen pretrained encoder (Saharia et al. 2022, Sec. 2.1), of a GLIDE decoder. It borrows the CLIP
    (``bind_siblings``), so the CLIP's weights are saved once, under ``clip``."""

    def __init__(self, cfg: ClipTextEncoderConfig | None = None) -> None:
        super().__init__()
        self.pooled_as_emb = cfg is not None and cfg.pooled_as_emb
        self.__dict__["clip"] = None
        self.produces = Spec(condition=self._keys())

    def _keys(self) -> frozenset[str]:
        return TEXT_KEYS | {"tokens"} | ({"emb"} if self.pooled_as_emb else set())

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        clip = components.get("clip")
        if clip is None:
            raise RegistryError(
                f"{where}encoder 'clip-text' reads captions with the recipe's CLIP: add components.clip"
            )
        self.__dict__["clip"] = clip
        self.produces = Spec(shape=(clip.embed_dim,), condition=self._keys())

    @property
    def context_width(self) -> int | None:
        return getattr(getattr(self.clip, "text", None), "width", None)

    @property
    def emb_width(self) -> int | None:
        return self.clip.embed_dim if self.pooled_as_emb and self.clip is not None else None

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.clip.tokenize(list(captions))

    @torch.no_grad()
    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" in condition:
            tokens = self.tokenize(condition["caption"])
            z_t, seq, mask = self.clip.encode_text_sequence(tokens)
            out.update(text_emb=z_t, context=seq.float(), context_mask=mask, tokens=tokens)
            if self.pooled_as_emb:
                out["emb"] = z_t
        return out


class TextPairConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    first: dict[str, Any] = spec_field(
        "encoder",
        ...,
        "the first text encoder, whose tokens the pipeline uses (e.g. GLIDE's, trained with the decoder)",
    )
    second: dict[str, Any] = spec_field(
        "encoder", {"type": "clip-text", "pooled_as_emb": True}, "the second (e.g. the recipe's frozen CLIP text tower)"
    )


class TextPairEncoder(Encoder):
    """Two text encoders read side by side, as eDiff-I conditions on T5 and CLIP text at once (Balaji et al. 2022,
    Sec. 4.1): ``context`` is both token sequences joined (equal widths, checked when bound), ``emb`` both pooled
    embeddings joined (``emb_dim_in`` their sum), ``tokens`` the first's. A trained encoder beside a frozen
    contrastive one: GLIDE's own reads shape, CLIP's reads position (docs/text.md)."""

    def __init__(self, first: Encoder, second: Encoder) -> None:
        super().__init__()
        self.first, self.second = first, second
        self.produces = Spec(condition=first.produces.condition | second.produces.condition)

    @property
    def clip(self) -> Any:
        """The recipe's CLIP when a part reads it, so the pipeline trains the CLIP first."""
        first = getattr(self.first, "clip", None)
        return first if first is not None else getattr(self.second, "clip", None)

    def _token_widths(self) -> tuple[int | None, int | None]:
        return tuple(getattr(p, "context_width", getattr(p, "width", None)) for p in (self.first, self.second))

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        for name, part in (("first", self.first), ("second", self.second)):
            if callable(getattr(part, "bind_siblings", None)):
                part.bind_siblings(components, where=f"{where}{name}: ")
        a, b = self._token_widths()
        if a is not None and b is not None and a != b:
            raise RegistryError(
                f"{where}encoder 'text-pair': the first encoder's tokens are {a} wide and the second's {b}; give the "
                "two encoders the same width"
            )

    @property
    def context_width(self) -> int | None:
        """The parts' common token width (None when a part's is unknown, or they differ, which binding refuses)."""
        a, b = self._token_widths()
        return a if a == b else None

    @property
    def emb_width(self) -> int | None:
        """The joined pooled width: each part's that gives ``emb``."""
        widths = [
            getattr(p, "emb_width", getattr(p, "width", None))
            for p in (self.first, self.second)
            if "emb" in p.produces.condition
        ]
        return sum(widths) if widths and None not in widths else None

    def tokenize(self, captions: list[str]) -> Tensor:
        return self.first.tokenize(captions)

    def encode(self, condition: Mapping[str, Any]) -> Condition:
        out = {k: v for k, v in condition.items() if k != "caption"}
        if "caption" not in condition:
            return out
        a, b = (part.encode({"caption": condition["caption"]}) for part in (self.first, self.second))
        out.update(
            context=torch.cat([a["context"], b["context"].to(a["context"].dtype)], dim=1),
            context_mask=torch.cat([a["context_mask"], b["context_mask"]], dim=1),
        )
        tokens = a.get("tokens", b.get("tokens"))  # for a guidance with its own text tower (CLIP guidance)
        if tokens is not None:
            out["tokens"] = tokens
        pooled = [p["emb"] for p in (a, b) if "emb" in p]
        if pooled:
            out["emb"] = torch.cat([p.to(pooled[0].dtype) for p in pooled], dim=-1)
        return out


@component("encoder", "text-pair", config=TextPairConfig)
def build_text_pair(cfg: TextPairConfig, ctx: Any) -> TextPairEncoder:
    """Two text encoders read side by side (eDiff-I): ``context`` both token sequences, ``emb`` both pooled ones."""
    parts = (
        ctx.registry.build("encoder", spec, data=ctx.data, where=f"encoder 'text-pair': {name}: ")
        for name, spec in (("first", cfg.first), ("second", cfg.second))
    )
    return TextPairEncoder(*parts)


class ClipPipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClipPipeline(Pipeline):
    """Trains ``components['clip']`` on the dataset's (image, caption) pairs. It draws no images."""

    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "main"
    ) -> dict[str, Tensor]:
        clip = self.components["clip"]
        out = clip_losses(clip, batch["image"], {"tokens": clip.text.tokenize(batch["caption"]).to(clip.device)})
        return {**out, "temperature": clip.logit_scale.detach().neg().exp()}

    def sample(
        self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        raise GenzooError(
            "a CLIP draws no images; measure it with `genzoo eval DIR --metrics zero-shot`, "
            "or use it in a recipe (guidance, reranking, DALL·E 2)"
        )

    @torch.no_grad()
    def zero_shot(self, images: Tensor, attributes: Tensor, *, batch_size: int = 500) -> dict[str, float]:
        return zero_shot_shapes(self.components["clip"], images, attributes, batch_size=batch_size)


@component("pipeline", "clip", config=ClipPipelineConfig)
def make_clip_pipeline(cfg: ClipPipelineConfig, ctx: Any) -> ClipPipeline:
    """Trains a CLIP alone with the symmetric contrastive loss (Radford et al. 2021)."""
    if "clip" not in ctx.components:
        raise RegistryError("pipeline 'clip' needs a component 'clip' (e.g. clip: {type: clip})")
    if ctx.data is not None and not ctx.data.has_captions:
        raise RegistryError(
            f"pipeline 'clip' trains on captions, and dataset '{ctx.data.name}' has none; use shapes or an "
            "imagefolder with captions"
        )
    return ClipPipeline(ctx.components)


@torch.no_grad()
def zero_shot_shapes(clip: Any, images: Tensor, attributes: Tensor, *, batch_size: int = 500) -> dict[str, float]:
    """Zero-shot attribute accuracy on ``shapes`` (CLIP Sec. 3.1.2): score every attribute combination's
    caption (one phrasing), and read each attribute off the argmax caption. ``attributes``: (N, 4)."""
    from itertools import product

    from genzoo.data.shapes import ATTRIBUTES, caption

    combos = list(product(*(range(len(v)) for v in ATTRIBUTES.values())))
    text = torch.cat(
        [clip.encode_text([caption(c, 0) for c in combos[i : i + 256]]) for i in range(0, len(combos), 256)]
    )
    table = torch.tensor(combos, device=text.device)
    best = torch.cat(
        [
            (clip.encode_image(images[i : i + batch_size].to(text.device)) @ text.T).argmax(-1)
            for i in range(0, len(images), batch_size)
        ]
    )
    pred, attributes = table[best].cpu(), attributes.cpu()
    out = {
        f"zero_shot_{name}": float((pred[:, j] == attributes[:, j]).double().mean())
        for j, name in enumerate(ATTRIBUTES)
    }
    out["zero_shot_all"] = float((pred == attributes).all(-1).double().mean())
    return out
