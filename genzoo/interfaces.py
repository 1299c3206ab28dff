"""The typed components of a generative model and how they compose.

Every family factorises as in DALL·E 2 (Ramesh et al. 2022, Eq. 1):
``P(x | y) = P(x | z, y) P(z | y)``. A condition ``y`` is *encoded*, a *prior* draws a
latent ``z``, a *decoder* draws the image ``x``. Iterative models are driven by a *sampler*;
steering toward the condition is a *guidance*. A *pipeline* wires the five together and owns
the training objective of its family.

Components declare what they consume and produce as :class:`Spec` values, so that a
composition is checked when the model is built (:func:`check_link`), not by a shape error deep
in a forward pass.

Conventions shared by every component:

* A condition is a ``dict[str, Tensor]`` whose values all have the batch on dim 0, so guidances
  can batch conditional and unconditional passes by concatenation. Keys in use: ``y`` (class
  index), ``tokens`` (text tokens), ``context`` / ``context_mask`` (token sequence for attention),
  ``emb`` (a pooled embedding), ``low_res`` (upsampler input) and ``drop`` (bool per sample:
  replace the condition by the learned null; classifier-free guidance and training-time condition
  dropout both use it).
* Images are float tensors in [-1, 1], shaped (B, C, H, W). Tokens are long tensors (B, L).
* Randomness comes from an explicit ``torch.Generator`` where a component samples.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from genzoo.errors import GenzooError

Condition = dict[str, Tensor]


class CompositionError(GenzooError):
    """Two components of a composition do not fit together."""


class SamplerKind(str, Enum):
    """Which family of iterative models a sampler or a guidance drives."""

    DIFFUSION = "diffusion"  # a denoiser over continuous tensors of any shape
    TOKEN = "token"  # next-token logits of an autoregressive model
    DIRECT = "direct"  # one-shot decoders (GAN, VAE): nothing to iterate


@dataclass(frozen=True)
class Spec:
    """What a component consumes or produces.

    ``shape`` excludes the batch dimension; ``None`` entries match anything. ``vocab_size`` is
    set for token tensors, ``condition`` names the condition keys a component needs.
    """

    shape: tuple[int | None, ...] | None = None
    dtype: str = "float"  # "float" or "long"
    vocab_size: int | None = None
    condition: frozenset[str] = field(default_factory=frozenset)

    def describe(self) -> str:
        parts = []
        if self.shape is not None:
            parts.append("shape (" + ", ".join("*" if s is None else str(s) for s in self.shape) + ")")
        parts.append(self.dtype)
        if self.vocab_size is not None:
            parts.append(f"vocab {self.vocab_size}")
        if self.condition:
            parts.append("condition {" + ", ".join(sorted(self.condition)) + "}")
        return " ".join(parts)


def check_link(producer: str, produces: Spec, consumer: str, consumes: Spec) -> None:
    """Fail with a message naming both components when ``produces`` cannot feed ``consumes``."""

    def fail(what: str) -> None:
        raise CompositionError(
            f"{producer} produces {produces.describe()} but {consumer} consumes "
            f"{consumes.describe()}: {what} differ; change one of them so they match"
        )

    if produces.dtype != consumes.dtype:
        fail("dtypes")
    if produces.shape is not None and consumes.shape is not None:
        if len(produces.shape) != len(consumes.shape):
            fail("ranks")
        for a, b in zip(produces.shape, consumes.shape):
            if a is not None and b is not None and a != b:
                fail("shapes")
    if produces.vocab_size is not None and consumes.vocab_size is not None:
        if produces.vocab_size > consumes.vocab_size:
            fail("vocabulary sizes")


def describe_component(role: str, component: Any) -> str:
    """``decoder 'diffusion-decoder'``: the role and the registered name, for error messages."""
    spec = getattr(component, "genzoo_spec", None)
    name = spec["type"] if spec else type(component).__name__
    return f"{role} '{name}'"


def check_composition(components: Mapping[str, Any]) -> None:
    """Check the links between the standard roles of a composition; raise naming both sides.

    Checked: prior -> decoder latents; encoder condition keys -> the ``needs_condition`` of the
    prior and the decoder;
    each iterative user (decoder, prior) against its sampler's kind; each guidance against the
    kind of the sampler that calls it.
    """
    c = components
    enc, prior, dec = c.get("encoder"), c.get("prior"), c.get("decoder")
    # a prior with a ``condition_key`` feeds the decoder a condition (unCLIP's z_i), not its latent
    if (
        prior is not None
        and dec is not None
        and hasattr(prior, "produces")
        and hasattr(dec, "consumes")
        and getattr(prior, "condition_key", None) is None
    ):
        check_link(describe_component("prior", prior), prior.produces, describe_component("decoder", dec), dec.consumes)
    if enc is not None and hasattr(enc, "produces"):
        for role, user in (("prior", prior), ("decoder", dec), ("guidance", c.get("guidance"))):
            needs = getattr(user, "needs_condition", frozenset())
            missing = set(needs) - set(enc.produces.condition)
            if missing:
                raise CompositionError(
                    f"{describe_component(role, user)} needs condition {sorted(missing)} but "
                    f"{describe_component('encoder', enc)} produces {sorted(enc.produces.condition)}; "
                    "use an encoder that produces them"
                )
    for user_role, sampler_role, guidance_role in (
        ("decoder", "sampler", "guidance"),
        ("prior", "prior_sampler", "prior_guidance"),
        ("upsampler_decoder", "upsampler_sampler", "upsampler_guidance"),
    ):
        user, sampler, guidance = c.get(user_role), c.get(sampler_role), c.get(guidance_role)
        needs = getattr(user, "sampler_kind", None)
        if sampler is not None and needs is not None and sampler.kind != needs:
            raise CompositionError(
                f"{describe_component(user_role, user)} needs a {needs.value} sampler but "
                f"{describe_component(sampler_role, sampler)} is a {sampler.kind.value} sampler; "
                f"pick a {needs.value} sampler (see `genzoo list --kind sampler`)"
            )
        if guidance is not None:
            if sampler is None:
                raise CompositionError(
                    f"{describe_component(guidance_role, guidance)} has no {sampler_role} to steer; add a "
                    f"{sampler_role}"
                )
            if guidance.kind != sampler.kind:
                raise CompositionError(
                    f"{describe_component(guidance_role, guidance)} is a {guidance.kind.value} guidance but "
                    f"{describe_component(sampler_role, sampler)} is a {sampler.kind.value} sampler; "
                    f"pick a {sampler.kind.value} guidance (see `genzoo list --kind guidance`)"
                )


def with_null_condition(cond: Condition, n: int, device: torch.device) -> Condition:
    """The condition twice along dim 0, the second half marked ``drop`` (the denoiser's learned null).

    Every tensor value is concatenated, other values pass through; a ``drop`` already present is
    kept for the conditional half.
    """
    doubled = {k: torch.cat([v, v]) if isinstance(v, Tensor) else v for k, v in cond.items() if k != "drop"}
    keep = cond.get("drop", torch.zeros(n, dtype=torch.bool, device=device))
    doubled["drop"] = torch.cat(
        [keep.to(device=device, dtype=torch.bool), torch.ones(n, dtype=torch.bool, device=device)]
    )
    return doubled


# --------------------------------------------------------------------------- components


class Encoder(nn.Module, ABC):
    """Turns a user condition (class ids, captions, images) into a :data:`Condition` dict.

    ``encode`` receives raw conditions (``{"y": ...}``, ``{"caption": [...]}``, ``{"image": ...}``)
    and returns tensors the prior and decoder consume (e.g. ``emb``, ``context``, ``tokens``).
    """

    produces: Spec

    @abstractmethod
    def encode(self, condition: Mapping[str, Any]) -> Condition: ...


class Prior(nn.Module, ABC):
    """Draws latents ``z ~ P(z | y)``: Gaussian noise, a fitted mixture, a diffusion or an AR prior.

    Priors that are themselves iterative (DALL·E 2's diffusion prior, a GPT over codes) receive
    their sampler and guidance from the pipeline; a prior never picks its own.
    """

    produces: Spec

    @abstractmethod
    def sample(
        self,
        n: int,
        condition: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        guidance: Guidance | None = None,
    ) -> Tensor: ...


class Decoder(nn.Module, ABC):
    """Maps a latent ``z`` (and the condition) to an image ``x``.

    One-shot decoders (GAN generator, VAE decoder) ignore ``sampler``; a diffusion decoder is a
    denoiser plus its Gaussian process and hands both to the sampler.
    """

    consumes: Spec
    produces: Spec

    @abstractmethod
    def decode(
        self,
        z: Tensor,
        condition: Condition | None = None,
        *,
        generator: torch.Generator | None = None,
        sampler: Sampler | None = None,
        guidance: Guidance | None = None,
    ) -> Tensor: ...


class LatentAutoencoder(Protocol):
    """The latent interface: what a decoder offers to be the first stage of latent diffusion (Rombach et al. 2022).

    A decoder that also encodes images to continuous latents and decodes them back implements three members
    (no base class; a composition checks them with :func:`missing_latent_interface`, never with ``isinstance``):

    * ``latent_shape``: ``tuple[int, ...]``, one latent without the batch: (C, h, w) for a spatial latent
      (a VQ-VAE's grid, diffusers' ``VQModel`` / ``AutoencoderKL``), (D,) for a vector (genzoo's AE / VAE).
    * ``encode_latents(x) -> z``: images (B, C, H, W) in [-1, 1] to latents (B, *latent_shape), deterministic
      and continuous, unscaled: a VAE's posterior mean (``AutoencoderKL``: the mode), a VQ model's
      pre-quantisation ``z_e`` (LDM's VQ first stages are diffused before quantisation).
    * ``decode_latents(z) -> x``: latents (B, *latent_shape) to images, about [-1, 1] (the composition
      clamps); a VQ model first snaps each latent vector to its nearest code.

    Optional: ``training_losses(x) -> dict[str, Tensor]`` with a ``loss`` entry, the first stage's own
    objective (reconstruction, and a codebook or KL term), for a composition that trains the first stage
    itself; a decoder without it (a pretrained, imported autoencoder) is used frozen, as it is.
    """

    latent_shape: tuple[int, ...]

    def encode_latents(self, x: Tensor) -> Tensor: ...

    def decode_latents(self, z: Tensor) -> Tensor: ...


LATENT_INTERFACE = ("latent_shape", "encode_latents", "decode_latents")


def missing_latent_interface(component: Any) -> list[str]:
    """The members of :class:`LatentAutoencoder` that ``component`` lacks; empty when it can be a first stage."""
    return [
        m
        for m in LATENT_INTERFACE
        if not (hasattr(component, m) if m == "latent_shape" else callable(getattr(component, m, None)))
    ]


class Sampler(ABC):
    """Drives an iterative model from noise (or a prefix) to a sample.

    A diffusion sampler receives the Gaussian process and a *denoiser*: any callable
    ``model(x_t, t, condition) -> Tensor`` whose output has the shape of ``x_t`` (2C channels on
    dim 1 when it learns the variance). It never inspects the tensor's rank, so a 3x32x32 image
    decoder and a 512-d embedding prior run on the same code. A token sampler receives a
    ``logits_fn(tokens, condition) -> logits`` of the next position.

    A sampler calls its guidance through the fixed methods of :class:`Guidance` and nothing
    else, so every guidance of its kind works with every sampler of that kind.
    """

    kind: SamplerKind

    def nfe(self) -> int:
        """Number of model evaluations per sample (for throughput reports)."""
        return 1


class Guidance(ABC):
    """Steers a sampler toward the condition (classifier, classifier-free, CLIP guidance).

    Diffusion guidances implement ``model_output`` (how the denoiser is called: CFG batches the
    conditional and unconditional passes there), ``condition_mean`` (the ancestral form) and
    ``condition_eps`` (the DDIM/eps form); token guidances implement ``logits``. The base
    methods are the identity, so a guidance overrides only what it changes.
    """

    kind: SamplerKind


class Importer(ABC):
    """Turns a foreign checkpoint or pipeline into a genzoo run directory (``genzoo import``, :func:`genzoo.api.
    import_model`); registered as kind ``importer`` with its config (the ``--option`` fields)."""

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg

    @abstractmethod
    def detect(self, source: str) -> bool:
        """Whether ``source`` (a path or a hub id) is this importer's format; cheap, and never unpickles."""

    @abstractmethod
    def run(self, source: str, out: Any, *, adapter: bool = False, data: Mapping[str, Any] | None = None) -> Any:
        """Write the run directory ``out`` for ``source``; returns its checkpoint folder. ``adapter``: keep the
        foreign network behind an adapter where it maps onto genzoo's own; ``data``: the dataset spec."""


class Pipeline(nn.Module, ABC):
    """A composed model: the components of a recipe plus the training objective of a family.

    ``components`` maps a role (``encoder``, ``prior``, ``decoder``, ``sampler``, ``guidance``,
    and family extras such as a GAN's ``discriminator``) to a built component.

    Training (see :class:`genzoo.training.Trainer`): ``stages`` lists the training stages in order
    (a tokenizer, then a prior); ``optimizer_groups(stage)`` maps optimiser names to parameters
    (a GAN has ``discriminator`` and ``generator``); ``training_losses`` returns per-batch scalar
    losses with a ``loss`` entry to minimise for the named optimiser.
    """

    stages: tuple[str, ...] = ("main",)

    def __init__(self, components: Mapping[str, Any]) -> None:
        super().__init__()
        self.components = dict(components)
        for role, comp in self.components.items():
            if isinstance(comp, nn.Module):
                self.add_module(role, comp)

    def optimizer_groups(self, stage: str = "main") -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    @abstractmethod
    def training_losses(
        self, batch: dict[str, Any], *, optimizer: str = "main", stage: str = "main"
    ) -> dict[str, Tensor]:
        """Scalar losses for one batch; ``loss`` is what the named optimiser minimises."""

    def ready_to_sample(self) -> bool:
        """False while sampling cannot work yet (DALL·E 2 before its prior stage); the trainer's sample
        grids skip those steps."""
        return True

    def begin_stage(self, stage: str, data: Mapping[str, Any]) -> None:
        """Hook run once before a stage's first step, with the whole training split (the unCLIP prior
        fits its embedding statistics here). What it sets must live in buffers: a resumed run restores
        them from the checkpoint and does not call it again. No-op by default."""

    def fit_after_training(self, data: Mapping[str, Tensor]) -> None:
        """Hook for post-hoc fitting (an AE's latent prior); no-op by default."""

    def encode_condition(self, condition: Mapping[str, Any] | None) -> Condition | None:
        """The user's condition as the prior and decoder read it: through the encoder, when there is one."""
        if not condition:
            return None
        encoder = self.components.get("encoder")
        return encoder.encode(condition) if encoder is not None else dict(condition)

    @torch.no_grad()
    def sample(
        self, n: int, condition: Mapping[str, Any] | None = None, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Draw ``n`` images in [-1, 1]: encode the condition, sample the prior, decode."""
        return self.sample_encoded(n, self.encode_condition(condition), generator=generator)

    @torch.no_grad()
    def sample_encoded(self, n: int, cond: Condition | None, *, generator: torch.Generator | None = None) -> Tensor:
        """``sample`` from a condition already encoded (a cascade reuses it for its upsampler)."""
        c = self.components
        z = c["prior"].sample(
            n, cond, generator=generator, sampler=c.get("prior_sampler"), guidance=c.get("prior_guidance")
        )
        return c["decoder"].decode(z, cond, generator=generator, sampler=c.get("sampler"), guidance=c.get("guidance"))
