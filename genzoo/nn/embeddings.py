"""Embeddings shared by the denoisers: the diffusion time step and the conditions added to it."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from pydantic import BaseModel, Field
from torch import Tensor, nn


class DenoiserConditions(BaseModel):
    """The fields every genzoo denoiser config shares (U-Net, MLP): the conditions :func:`condition_embedding` adds
    to the time embedding, and the learned-variance output the diffusion decoder sets."""

    num_classes: int | None = Field(
        None,
        ge=1,
        description="class-conditional with this many classes (as ADM); index num_classes is the learned null",
    )
    emb_dim_in: int | None = Field(
        None,
        ge=1,
        description="dim of cond['emb'] (e.g. GLIDE's pooled caption, unCLIP's z_i), projected and added to the "
        "time embedding",
    )
    learn_sigma: bool | None = Field(
        None,
        description="also output the variance interpolation v (Improved DDPM Eq. 15); None: set by the "
        "diffusion decoder's var_type",
    )


def timestep_embedding(
    t: Tensor, dim: int, max_period: float = 10_000.0, *, flip_sin_to_cos: bool = True, freq_shift: float = 0.0
) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) steps (Vaswani et al. 2017, Sec. 3.5; DDPM App. B).

    ``[cos(t w_0..w_{h-1}), sin(t w_0..w_{h-1})]`` with ``h = dim // 2`` and ``w_i = max_period^(-i/(h - freq_shift))``
    (the improved-diffusion layout); ``flip_sin_to_cos=False`` puts sin first and ``freq_shift=1`` divides by
    h - 1, as the original DDPM code (diffusers' ``Timesteps(flip_sin_to_cos, downscale_freq_shift)``). A zero
    column pads an odd ``dim``. float32 whatever ``t`` is.
    """
    half = dim // 2
    steps = torch.arange(half, device=t.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * steps / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    cos, sin = torch.cos(args), torch.sin(args)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


def with_null(value: Tensor | None, null: Tensor, drop: Tensor | None, batch: int) -> Tensor:
    """``value`` per sample, or ``null`` where ``drop`` is set or everywhere when ``value`` is missing.

    The null condition of classifier-free guidance (Ho & Salimans 2021): a missing condition and a
    dropped one are the same input, so a model trained with dropout samples unconditionally too.
    ``torch.where`` keeps it sync-free (no ``drop.any()`` on the host).
    """
    if value is None:
        return null.expand(batch, *null.shape)
    if drop is None:
        return value
    return torch.where(drop.view(-1, *[1] * null.dim()), null.to(value.dtype), value)


def condition_embedding(
    emb: Tensor,
    cond: Mapping[str, Tensor],
    *,
    class_emb: nn.Embedding | None,
    emb_proj: nn.Linear | None,
    null_emb: Tensor | None,
) -> Tensor:
    """Add the class embedding (ADM Sec. 3) and the projected pooled embedding (GLIDE Sec. 2.3; unCLIP
    Sec. 2.1) to the time embedding ``emb``; the null class is the last row of ``class_emb``."""
    drop, batch = cond.get("drop"), emb.shape[0]
    if class_emb is not None:
        null_y = torch.full((), class_emb.num_embeddings - 1, dtype=torch.long, device=emb.device)
        emb = emb + class_emb(with_null(cond.get("y"), null_y, drop, batch))
    if emb_proj is not None:
        emb = emb + emb_proj(pooled_or_null(cond, null_emb, batch).to(emb.dtype))
    return emb


def either(a: Tensor | None, b: Tensor | None) -> Tensor | None:
    """The union of two optional per-sample drop masks."""
    return b if a is None else a if b is None else a | b


def pooled_or_null(cond: Mapping[str, Tensor], null_emb: Tensor, batch: int) -> Tensor:
    """``cond['emb']``, or the learned null where ``drop`` or ``drop_emb`` is set: unCLIP drops its CLIP
    embedding and its caption independently (Sec. 2.1), so each has its own mask."""
    return with_null(cond.get("emb"), null_emb, either(cond.get("drop"), cond.get("drop_emb")), batch)
