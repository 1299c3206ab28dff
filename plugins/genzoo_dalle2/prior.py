"""unCLIP's priors P(z_i | y) over CLIP image embeddings (Ramesh et al. 2022, Sec. 2.2).

Both take the caption as the CLIP text encoder gives it (``text_emb`` z_t, the per-token ``context``)
and produce a unit-norm image embedding z_i, the condition of the unCLIP decoder (``condition_key``),
not the decoder's latent:

* ``diffusion-prior``: a causal transformer over [text tokens; z_t; t; z_i^(t); query] whose output at
  the query predicts the clean z_i (x0-prediction), run by the shared diffusion decoder over vectors,
  so every diffusion sampler and guidance drives it. z_i is standardised per dimension first: raw
  unit-norm entries (about 1/sqrt(d)) are badly scaled for a unit-variance diffusion.
* ``ar-prior``: z_i reduced by PCA, each component cut into uniform bins, the bin sequence predicted
  by the shared GPT with [text tokens; z_t] as its prefix.

Both drop the caption with probability ``cond_drop`` in training (classifier-free guidance) and keep
the best of ``best_of`` draws by similarity to z_t.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from genzoo.diffusion.decoder import DiffusionDecoder
from genzoo.diffusion.gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_timestep_sampler,
)
from genzoo.diffusion.schedules import get_named_beta_schedule
from genzoo.errors import GenzooError, RegistryError
from genzoo.interfaces import Condition, Prior, SamplerKind, Spec
from genzoo.nn.embeddings import timestep_embedding, with_null
from genzoo.nn.gpt import GPT, Block, CachedLogits, TransformerSize
from genzoo.registry import component
from genzoo.text.clip import TEXT_KEYS


def repeat_condition(cond: Condition | None, k: int) -> Condition | None:
    """Each sample's condition ``k`` times in a row (best-of-k draws)."""
    if not cond or k == 1:
        return cond
    return {key: v.repeat_interleave(k, 0) if isinstance(v, Tensor) else v for key, v in cond.items()}


class CaptionPrefix(nn.Module):
    """The caption as ``text_length + 1`` vectors of width ``n_embd``: its CLIP token outputs (padding
    zeroed) and z_t, each projected; learned null vectors where the caption is dropped or missing."""

    def __init__(self, *, dim: int, text_width: int, text_length: int, n_embd: int) -> None:
        super().__init__()
        self.dim, self.text_length = dim, text_length
        self.text_proj, self.text_emb_proj = nn.Linear(text_width, n_embd), nn.Linear(dim, n_embd)
        self.null_text = nn.Parameter(torch.zeros(text_length, n_embd))
        self.null_text_emb = nn.Parameter(torch.zeros(n_embd))

    def forward(self, cond: Condition | None, batch: int) -> Tensor:
        cond = cond or {}
        drop = cond.get("drop")
        text = zt = None
        if "context" in cond:
            ctx = cond["context"][:, : self.text_length].float()
            if "context_mask" in cond:
                ctx = ctx * cond["context_mask"][:, : self.text_length, None]
            text = self.text_proj(F.pad(ctx, (0, 0, 0, self.text_length - ctx.shape[1])))
            batch = len(text)
        if "text_emb" in cond:  # unit norm; sqrt(d) gives the projection unit-scale inputs
            zt = self.text_emb_proj(cond["text_emb"].float() * math.sqrt(self.dim))
            batch = len(zt)
        text = with_null(text, self.null_text, drop, batch)
        zt = with_null(zt, self.null_text_emb, drop, batch)
        return torch.cat([text, zt[:, None]], dim=1)


class EmbeddingPrior(Prior):
    """What both unCLIP priors share: bound to the recipe's CLIP for their sizes, per-dimension
    statistics of z_i fitted on the training set (:meth:`fit`), best-of-k selection."""

    condition_key = "emb"  # the decoder's condition, not its latent (interfaces.check_composition)
    needs_condition = TEXT_KEYS

    def __init__(self, *, best_of: int) -> None:
        super().__init__()
        self.best_of = best_of
        self.dim: int | None = None
        self.produces = Spec(shape=(None,))
        self.register_buffer("_device_probe", torch.zeros(()), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    def bind_siblings(self, components: Mapping[str, Any], *, where: str = "") -> None:
        clip = components.get("clip")
        if clip is None:
            raise RegistryError(
                f"{where}prior '{self.genzoo_name}' models CLIP image embeddings: add components.clip "
                "({type: clip} trained in the recipe, or {type: open-clip, pretrained: TAG})"
            )
        self.dim = clip.embed_dim
        self.produces = Spec(shape=(self.dim,))
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("std", torch.ones(self.dim))
        self.register_buffer("stats_fitted", torch.zeros((), dtype=torch.bool))
        self._build(dim=self.dim, text_width=clip.text_width, text_length=clip.context_length)

    @property
    def genzoo_name(self) -> str:
        return getattr(self, "genzoo_spec", {}).get("type", type(self).__name__)

    def _build(self, *, dim: int, text_width: int, text_length: int) -> None: ...

    @torch.no_grad()
    def fit(self, z: Tensor) -> None:
        """Per-dimension mean and std of training embeddings ``z`` (N, d)."""
        z = z.to(self.mean.device).float()
        self.mean.copy_(z.mean(0))
        self.std.copy_(z.std(0).clamp_min(1e-6))
        self.stats_fitted.fill_(True)

    def _check(self, sampler: Any) -> None:
        if self.dim is None:
            raise GenzooError(
                f"prior '{self.genzoo_name}' is not bound to a CLIP; build it inside a recipe with components.clip"
            )
        if not bool(self.stats_fitted):
            raise GenzooError(
                f"prior '{self.genzoo_name}' has no embedding statistics: train the recipe's prior stage first"
            )
        if sampler is None:
            kind = "diffusion" if self.sampler_kind is SamplerKind.DIFFUSION else "token"
            raise GenzooError(
                f"prior '{self.genzoo_name}' needs a {kind} sampler: add `prior_sampler: {{type: "
                f"{'ddim' if kind == 'diffusion' else 'token'}}}` to the recipe"
            )

    def sample(self, n, condition: Condition | None = None, *, generator=None, sampler=None, guidance=None) -> Tensor:
        """``n`` unit-norm z_i; with ``best_of`` k > 1 and a caption, the one of k draws closest to z_t (unCLIP
        Sec. 2.2)."""
        self._check(sampler)
        k = self.best_of if condition and "text_emb" in condition else 1
        z = F.normalize(
            self.draw(n * k, repeat_condition(condition, k), sampler=sampler, guidance=guidance, generator=generator),
            dim=-1,
        )
        if k == 1:
            return z
        score = (z.view(n, k, -1) * condition["text_emb"].to(z)[:, None]).sum(-1)
        return z.view(n, k, -1)[torch.arange(n, device=z.device), score.argmax(1)]

    def draw(self, n: int, condition: Condition | None, *, sampler: Any, guidance: Any, generator: Any) -> Tensor:
        """``n`` raw (unnormalised) embeddings."""
        raise NotImplementedError


# --------------------------------------------------------------------------- diffusion prior


class DiffusionPriorConfig(TransformerSize):
    model_config = ConfigDict(extra="forbid")
    schedule: str = Field("cosine", description="beta schedule of the prior's diffusion")
    timesteps: int = Field(
        1000, ge=1, description="T in training; the prior_sampler respaces it (unCLIP samples with 64 steps)"
    )
    width: int = Field(256, ge=8, description="width of the residual stream")
    cond_drop: float = Field(
        0.1, ge=0, le=1, description="probability of dropping the caption (tokens and z_t) in training, for CFG"
    )
    clip_range: float | None = Field(
        10.0, gt=0, description="clamp x0_hat to +-c in standardised units when sampling; null: off"
    )
    best_of: int = Field(
        2, ge=1, description="draws per caption; the one with the largest dot product with z_t is kept"
    )


class PriorTransformer(nn.Module):
    """``forward(x_t (B, d), t, cond) -> x0_hat (B, d)``: causal blocks of the shared GPT over
    [caption prefix; t; x_t; query], read out at the query (unCLIP Sec. 2.2)."""

    def __init__(self, cfg: DiffusionPriorConfig, *, dim: int, text_width: int, text_length: int) -> None:
        super().__init__()
        e = cfg.width
        self.prefix = CaptionPrefix(dim=dim, text_width=text_width, text_length=text_length, n_embd=e)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.x_proj = nn.Linear(dim, e)
        self.query = nn.Parameter(torch.randn(e) * 0.02)
        self.pos = nn.Parameter(torch.randn(text_length + 4, e) * 0.01)
        gpt = cfg.gpt_config(vocab_size=1, block_size=text_length + 4, where="prior 'diffusion-prior'")
        self.blocks = nn.ModuleList(Block(gpt) for _ in range(cfg.layers))
        self.ln_f, self.out = nn.LayerNorm(e), nn.Linear(e, dim)
        self.apply(GPT._init_weights)

    def forward(self, x: Tensor, t: Tensor, cond: Condition | None = None) -> Tensor:
        b = x.shape[0]
        time = self.time_mlp(timestep_embedding(t, self.query.shape[0]).to(x.dtype))
        seq = torch.cat(
            [self.prefix(cond, b), time[:, None], self.x_proj(x)[:, None], self.query.expand(b, 1, -1)], dim=1
        )
        h = seq + self.pos
        for block in self.blocks:
            h, _ = block(h)
        return self.out(self.ln_f(h[:, -1]))


@component("prior", "diffusion-prior", config=DiffusionPriorConfig)
class DiffusionPrior(EmbeddingPrior):
    """unCLIP's diffusion prior: the shared :class:`DiffusionDecoder` over standardised z_i, with x0-prediction
    and loss ``|| f(z_i^(t), t, y) - z_i ||^2`` (L_simple on x0)."""

    sampler_kind = SamplerKind.DIFFUSION

    def __init__(self, cfg: DiffusionPriorConfig) -> None:
        super().__init__(best_of=cfg.best_of)
        self.cfg = cfg

    def _build(self, *, dim: int, text_width: int, text_length: int) -> None:
        c = self.cfg
        diffusion = GaussianDiffusion(
            betas=get_named_beta_schedule(c.schedule, c.timesteps),
            model_mean_type=ModelMeanType.START_X,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.SIMPLE,
            clip_range=c.clip_range,
        )
        net = PriorTransformer(c, dim=dim, text_width=text_width, text_length=text_length)
        self.model = DiffusionDecoder(
            denoiser=net,
            diffusion=diffusion,
            shape=(dim,),
            cond_drop=c.cond_drop,
            timestep_sampler=create_timestep_sampler("uniform", diffusion),
        )

    def training_losses(self, z: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        out = self.model.training_losses((z.float() - self.mean) / self.std, condition)
        return {"loss": out["loss"], "x0_mse": out["loss"].detach()}

    def draw(self, n, condition, *, sampler, guidance, generator) -> Tensor:
        noise = torch.randn(
            (n, self.dim), generator=generator, device=generator.device if generator is not None else self.device
        )
        z = self.model.decode(noise.to(self.device), condition, generator=generator, sampler=sampler, guidance=guidance)
        return z * self.std + self.mean


# --------------------------------------------------------------------------- autoregressive prior


class ARPriorConfig(TransformerSize):
    model_config = ConfigDict(extra="forbid")
    pca_dims: int = Field(16, ge=1, description="principal components of z_i kept (unCLIP: 319 of 1024)")
    bins: int = Field(64, ge=2, description="uniform bins per component (unCLIP: 1024)")
    bin_range: float = Field(3.0, gt=0, description="the bins cover +-bin_range standard deviations of each component")
    cond_drop: float = Field(
        0.1, ge=0, le=1, description="probability of dropping the caption in training, for logit CFG"
    )
    best_of: int = Field(
        2, ge=1, description="draws per caption; the one with the largest dot product with z_t is kept"
    )


@component("prior", "ar-prior", config=ARPriorConfig)
class ARPrior(EmbeddingPrior):
    """unCLIP's autoregressive prior: z_i -> PCA -> uniform bins, the bin sequence modelled by the shared GPT."""

    sampler_kind = SamplerKind.TOKEN

    def __init__(self, cfg: ARPriorConfig) -> None:
        super().__init__(best_of=cfg.best_of)
        self.cfg = cfg

    @property
    def tokens_per_sample(self) -> int:
        return self.cfg.pca_dims

    def _build(self, *, dim: int, text_width: int, text_length: int) -> None:
        c = self.cfg
        if c.pca_dims > dim:
            raise RegistryError(
                f"prior 'ar-prior': field 'pca_dims' is {c.pca_dims} but the CLIP embedding has {dim} dims; lower it"
            )
        self.register_buffer("basis", torch.eye(dim)[: c.pca_dims].clone())
        self.register_buffer("scale", torch.ones(c.pca_dims))
        self.prefix = CaptionPrefix(dim=dim, text_width=text_width, text_length=text_length, n_embd=c.width)
        self.gpt = GPT(
            c.gpt_config(vocab_size=c.bins, block_size=text_length + 1 + c.pca_dims, where="prior 'ar-prior'")
        )

    @torch.no_grad()
    def fit(self, z: Tensor) -> None:
        """The mean and the top ``pca_dims`` principal directions of ``z`` and the spread along each."""
        super().fit(z)
        centred = z.to(self.mean.device).float() - self.mean
        _, _, vh = torch.linalg.svd(centred, full_matrices=False)
        self.basis.copy_(vh[: self.cfg.pca_dims])
        self.scale.copy_((centred @ self.basis.T).std(0).clamp_min(1e-6))

    def quantize(self, z: Tensor) -> Tensor:
        """(N, d) embeddings -> (N, pca_dims) bin indices (in fp32 under any autocast: bf16 would move bin edges)."""
        c = self.cfg
        with torch.autocast(z.device.type, enabled=False):
            u = ((z.float() - self.mean) @ self.basis.T / self.scale).clamp(-c.bin_range, c.bin_range)
        return ((u + c.bin_range) / (2 * c.bin_range) * c.bins).long().clamp(0, c.bins - 1)

    def dequantize(self, codes: Tensor) -> Tensor:
        """Bin centres back to the embedding space (the discarded components at their mean)."""
        c = self.cfg
        u = (codes.float() + 0.5) / c.bins * 2 * c.bin_range - c.bin_range
        with torch.autocast(codes.device.type, enabled=False):
            return (u * self.scale) @ self.basis + self.mean

    def training_losses(self, z: Tensor, condition: Condition | None = None) -> dict[str, Tensor]:
        codes, cond = self.quantize(z), dict(condition or {})
        if self.cfg.cond_drop > 0 and cond:
            cond["drop"] = torch.rand(len(codes), device=codes.device) < self.cfg.cond_drop
        _, loss = self.gpt(codes, targets=codes, prefix_emb=self.prefix(cond, len(codes)))
        return {"loss": loss, "nll": loss.detach()}

    def draw(self, n, condition, *, sampler, guidance, generator) -> Tensor:
        logits_fn = CachedLogits(self.gpt, prefix=lambda c: self.prefix(c, n))
        start = torch.zeros((n, 0), dtype=torch.long, device=self.device)
        codes = sampler.sample(
            logits_fn, start, self.cfg.pca_dims, condition=condition, guidance=guidance, generator=generator
        )
        return self.dequantize(codes)
