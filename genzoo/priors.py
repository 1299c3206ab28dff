"""Priors shared by several families: Gaussian noise, latent densities fitted after training, token priors.

A prior whose size follows the decoder it feeds (``shape: null``) is *bound* to that decoder when
the model is built (:func:`bind_priors`), so swapping a prior never means repeating a latent size.

* ``gaussian``: ``z ~ N(0, I)`` (a GAN's noise, a VAE's prior, a diffusion model's x_T).
* ``fitted-gaussian`` and ``gmm``: densities fitted on the training latents of an AE after
  training (the AE is not generative on its own; ALGORITHMS.md "VAE, AE, DAE").
* ``uniform-tokens`` and ``gpt``: priors over a grid of discrete codes (VQ-VAE Sec. 3.1: a uniform
  prior during training, an autoregressive prior fitted afterwards).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Prior, SamplerKind, Spec
from genzoo.nn.embeddings import with_null
from genzoo.nn.gpt import GPT, CachedLogits, TransformerSize
from genzoo.registry import component, registered_name


def bind_priors(components: Mapping[str, Any]) -> None:
    """Size every unsized prior from the decoder it feeds (``prior.bind(decoder.consumes)``)."""
    prior, decoder = components.get("prior"), components.get("decoder")
    if prior is not None and decoder is not None and hasattr(prior, "bind") and hasattr(decoder, "consumes"):
        prior.bind(decoder.consumes)


def build_embedding_diffusion(ctx: Any, spec: Mapping[str, Any], dim: int, *, where: str) -> Any:
    """The diffusion decoder inside a prior over ``dim``-d CLIP image embeddings (unCLIP Sec. 2.2): built from the
    prior's ``diffusion`` spec for the data resized to ``(dim,)``, and checked to be one (errors begin ``where``)."""
    if ctx.data is None:
        raise RegistryError(f"{where}needs a dataset spec to be built")
    data = dataclasses.replace(ctx.data, image_shape=(dim,))
    inner = ctx.registry.build("decoder", dict(spec), data=data, where=f"{where}diffusion: ")
    shape = getattr(getattr(inner, "consumes", None), "shape", None)
    if getattr(inner, "sampler_kind", None) is not SamplerKind.DIFFUSION or tuple(shape or ()) != (dim,):
        raise RegistryError(f"{where}field 'diffusion' must be a diffusion decoder over ({dim},)")
    return inner


class SizedPrior(Prior):
    """A prior over tensors of a fixed ``shape`` that may be given late by :meth:`bind`."""

    def __init__(self, shape: Sequence[int] | None, dtype: str = "float") -> None:
        super().__init__()
        self.shape, self.dtype = (tuple(shape) if shape else None), dtype
        self.produces = Spec(shape=self.shape, dtype=dtype)
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)
        if self.shape is not None:
            self._build(self.shape)

    def bind(self, consumes: Spec) -> None:
        if self.shape is not None or consumes.shape is None or None in consumes.shape:
            return
        self.shape = tuple(consumes.shape)
        self.produces = Spec(shape=self.shape, dtype=self.dtype, vocab_size=consumes.vocab_size)
        self._build(self.shape)

    def _build(self, shape: tuple[int, ...]) -> None:
        """Create shape-dependent parameters and buffers."""

    def _check_bound(self) -> tuple[int, ...]:
        if self.shape is None:
            raise GenzooError(
                f"prior '{registered_name(self)}' has no shape: set `shape` or compose it with a decoder that has one"
            )
        return self.shape

    @property
    def device(self) -> torch.device:
        return self._device_probe.device


# --------------------------------------------------------------------------- continuous


class GaussianPriorConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(None, description="latent shape without the batch; None takes the decoder's")


@component("prior", "gaussian", config=GaussianPriorConfig)
class GaussianPrior(SizedPrior):
    """An isotropic Gaussian z ~ N(0, I); nothing to fit."""

    def __init__(self, cfg: GaussianPriorConfig) -> None:
        super().__init__(cfg.shape)

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        return torch.randn((n, *self._check_bound()), generator=generator, device=self.device)

    def log_prob(self, z: Tensor) -> Tensor:
        d = z[0].numel()
        return -0.5 * z.flatten(1).pow(2).sum(1) - 0.5 * d * math.log(2 * math.pi)


class FittedGaussianConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(None, description="latent shape; None takes the decoder's")
    jitter: float = Field(
        1e-5, ge=0, description="added to the covariance diagonal (relative to its mean) for stability"
    )


@component("prior", "fitted-gaussian", config=FittedGaussianConfig)
class FittedGaussian(SizedPrior):
    """``N(mu, Sigma)`` with the mean and full covariance of the training latents, fitted after training."""

    def __init__(self, cfg: FittedGaussianConfig) -> None:
        self.jitter = cfg.jitter
        super().__init__(cfg.shape)

    def _build(self, shape: tuple[int, ...]) -> None:
        d = math.prod(shape)
        self.register_buffer("mean", torch.zeros(d))
        self.register_buffer("scale_tril", torch.eye(d))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def fit(self, z: Tensor, *, generator: torch.Generator | None = None) -> None:
        z = z.flatten(1).double()
        cov = torch.cov(z.t()).reshape(z.shape[1], z.shape[1])
        cov = cov + self.jitter * cov.diagonal().mean() * torch.eye(len(cov), dtype=cov.dtype, device=cov.device)
        self.mean.copy_(z.mean(0))
        self.scale_tril.copy_(torch.linalg.cholesky(cov))
        self.fitted.fill_(True)

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        _require_fit(self)
        eps = torch.randn((n, len(self.mean)), generator=generator, device=self.device)
        return (self.mean + eps @ self.scale_tril.t()).view(n, *self._check_bound())


class GMMConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(None, description="latent shape; None takes the decoder's")
    components: int = Field(10, ge=1, description="mixture components K")
    iterations: int = Field(100, ge=1, description="EM iterations")
    jitter: float = Field(
        1e-4, ge=0, description="added to each covariance diagonal (relative) to keep it positive definite"
    )
    seed: int = Field(0, description="seed of the k-means++ initialisation")


@component("prior", "gmm", config=GMMConfig)
class GaussianMixturePrior(SizedPrior):
    """A K-component full-covariance Gaussian mixture fitted by EM (Dempster et al. 1977), k-means++ start."""

    def __init__(self, cfg: GMMConfig) -> None:
        self.cfg = cfg
        super().__init__(cfg.shape)

    def _build(self, shape: tuple[int, ...]) -> None:
        d, k = math.prod(shape), self.cfg.components
        self.register_buffer("log_weights", torch.full((k,), -math.log(k)))
        self.register_buffer("means", torch.zeros(k, d))
        self.register_buffer("scale_trils", torch.eye(d).repeat(k, 1, 1))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def _log_resp(self, z: Tensor) -> tuple[Tensor, Tensor]:
        dist = torch.distributions.MultivariateNormal(self.means.to(z.dtype), scale_tril=self.scale_trils.to(z.dtype))
        joint = dist.log_prob(z[:, None]) + self.log_weights.to(z.dtype)
        return joint - joint.logsumexp(1, keepdim=True), joint.logsumexp(1)

    def log_prob(self, z: Tensor) -> Tensor:
        return self._log_resp(z.flatten(1).double())[1]

    @torch.no_grad()
    def fit(self, z: Tensor, *, generator: torch.Generator | None = None) -> None:
        z = z.flatten(1).double().cpu()
        n, d = z.shape
        k = min(self.cfg.components, n)
        g = torch.Generator().manual_seed(self.cfg.seed)
        centres = [z[torch.randint(n, (1,), generator=g)].squeeze(0)]
        for _ in range(1, k):  # k-means++ (Arthur & Vassilvitskii 2007)
            d2 = torch.cdist(z, torch.stack(centres)).min(1).values.pow(2)
            centres.append(z[torch.multinomial(d2 / d2.sum(), 1, generator=g)].squeeze(0))
        means = torch.stack(centres)
        scale = z.var(0).mean()
        eye = torch.eye(d, dtype=z.dtype)
        covs = (scale * eye).repeat(k, 1, 1)
        weights = torch.full((k,), 1.0 / k, dtype=z.dtype)
        for _ in range(self.cfg.iterations):
            dist = torch.distributions.MultivariateNormal(means, covariance_matrix=covs)
            joint = dist.log_prob(z[:, None]) + weights.log()
            resp = (joint - joint.logsumexp(1, keepdim=True)).exp()  # E step
            nk = resp.sum(0) + 1e-10
            weights = nk / n  # M step
            means = (resp.t() @ z) / nk[:, None]
            diff = z[None] - means[:, None]
            covs = torch.einsum("kn,kni,knj->kij", resp.t(), diff, diff) / nk[:, None, None]
            covs = covs + self.cfg.jitter * scale * eye
        self.log_weights.copy_(torch.full_like(self.log_weights, float("-inf")))
        self.log_weights[:k].copy_(weights.log())
        self.means[:k].copy_(means)
        self.scale_trils[:k].copy_(torch.linalg.cholesky(covs))
        self.fitted.fill_(True)

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        _require_fit(self)
        comp = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)
        eps = torch.randn((n, self.means.shape[1]), generator=generator, device=self.device)
        z = self.means[comp] + torch.einsum("nij,nj->ni", self.scale_trils[comp], eps)
        return z.view(n, *self._check_bound())


def _require_fit(prior: Prior) -> None:
    if not bool(prior.fitted):
        raise GenzooError(
            f"prior '{registered_name(prior)}' has not been fitted to the training latents; train the model to the end "
            "(the pipeline fits it after training) or use the gaussian prior"
        )


# --------------------------------------------------------------------------- discrete codes


class UniformTokensConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(None, description="code grid shape; None takes the decoder's")
    vocab_size: int | None = Field(None, ge=1, description="number of codes; None takes the decoder's")


@component("prior", "uniform-tokens", config=UniformTokensConfig)
class UniformTokens(SizedPrior):
    """Codes drawn independently and uniformly: the VQ-VAE's training-time prior (Sec. 3.1), a baseline."""

    def __init__(self, cfg: UniformTokensConfig) -> None:
        self.vocab_size = cfg.vocab_size
        super().__init__(cfg.shape, dtype="long")
        self.produces = Spec(shape=self.shape, dtype="long", vocab_size=self.vocab_size)

    def bind(self, consumes: Spec) -> None:
        self.vocab_size = self.vocab_size or consumes.vocab_size
        super().bind(consumes)

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        if self.vocab_size is None:
            raise GenzooError("prior 'uniform-tokens' has no vocab_size: set it or compose it with a token decoder")
        return torch.randint(0, self.vocab_size, (n, *self._check_bound()), generator=generator, device=self.device)


class GPTPriorConfig(TransformerSize):
    model_config = ConfigDict(extra="forbid")
    shape: list[int] | None = Field(None, description="code grid shape; None takes the decoder's")
    vocab_size: int | None = Field(None, ge=1, description="number of codes; None takes the decoder's")
    class_conditional: bool = Field(False, description="prefix the dataset's class (its label) to the codes")
    cond_drop: float = Field(
        0.1, ge=0, le=1, description="probability of the null class in training (classifier-free guidance)"
    )


class GPTPrior(SizedPrior):
    """An autoregressive prior over a code grid in raster order (VQ-VAE Sec. 3.2, with a GPT in place of PixelCNN).

    The first position is a learned prefix vector: the class embedding, or the null class, which is
    both the unconditional start token and the null condition of classifier-free guidance on logits.
    """

    sampler_kind = SamplerKind.TOKEN

    def __init__(self, cfg: GPTPriorConfig, num_classes: int | None = None) -> None:
        self.cfg, self.num_classes = cfg, num_classes
        self.vocab_size = cfg.vocab_size
        super().__init__(cfg.shape, dtype="long")
        self.needs_condition = frozenset({"y"}) if num_classes else frozenset()

    def bind(self, consumes: Spec) -> None:
        self.vocab_size = self.vocab_size or consumes.vocab_size
        super().bind(consumes)

    def _build(self, shape: tuple[int, ...]) -> None:
        if self.vocab_size is None:
            raise GenzooError("prior 'gpt' has no vocab_size: set it or compose it with a token decoder")
        c = self.cfg
        self.produces = Spec(shape=shape, dtype="long", vocab_size=self.vocab_size)
        self.gpt = GPT(c.gpt_config(vocab_size=self.vocab_size, block_size=math.prod(shape) + 1, where="prior 'gpt'"))
        self.class_emb = nn.Embedding((self.num_classes or 0) + 1, c.width)  # last row: the null class
        nn.init.normal_(self.class_emb.weight, std=0.02)

    def _prefix(self, condition: Condition | None, batch: int) -> Tensor:
        null = torch.full((), self.class_emb.num_embeddings - 1, dtype=torch.long, device=self.device)
        cond = condition or {}
        if "y" in cond:
            batch = len(cond["y"])
        y = with_null(cond.get("y") if self.num_classes else None, null, cond.get("drop"), batch)
        return self.class_emb(y)[:, None]

    def training_losses(self, codes: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        """Next-code cross-entropy (nats per code); the class is dropped with probability ``cond_drop``."""
        flat = codes.flatten(1)
        cond = dict(condition or {})
        if self.num_classes and self.cfg.cond_drop > 0 and "y" in cond:
            cond["drop"] = torch.rand(len(flat), device=flat.device) < self.cfg.cond_drop
        _, loss = self.gpt(flat, targets=flat, prefix_emb=self._prefix(cond, len(flat)))
        return {"loss": loss, "nll": loss.detach()}

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        shape = self._check_bound()
        if sampler is None:
            raise GenzooError("prior 'gpt' needs a token sampler; add `prior_sampler: {type: token}` to the recipe")
        logits_fn = CachedLogits(self.gpt, prefix=lambda c: self._prefix(c, n))
        start = torch.zeros((n, 0), dtype=torch.long, device=self.device)
        codes = sampler.sample(
            logits_fn, start, math.prod(shape), condition=condition, guidance=guidance, generator=generator
        )
        return codes.view(n, *shape)


@component("prior", "gpt", config=GPTPriorConfig)
def make_gpt_prior(cfg: GPTPriorConfig, ctx=None) -> GPTPrior:
    """An autoregressive GPT over a code grid in raster order (van den Oord et al. 2017, Sec. 3.3)."""
    num_classes = getattr(getattr(ctx, "data", None), "num_classes", None)
    if cfg.class_conditional and not num_classes:
        raise GenzooError(
            "prior 'gpt': field 'class_conditional' is true but the dataset has no classes; set it to false"
        )
    return GPTPrior(cfg, num_classes if cfg.class_conditional else None)


def fit_latent_prior(prior: Prior, latents: Tensor) -> bool:
    """Fit ``prior`` to ``latents`` when it is a fitted density (has ``fit``); True if it was fitted."""
    fit = getattr(prior, "fit", None)
    if fit is None:
        return False
    fit(latents)
    return True


__all__ = [
    "SizedPrior",
    "FittedGaussian",
    "GPTPrior",
    "GaussianMixturePrior",
    "GaussianPrior",
    "UniformTokens",
    "bind_priors",
    "fit_latent_prior",
]
