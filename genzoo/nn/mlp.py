"""A residual MLP denoiser for vectors (B, D): the DALL·E 2 prior's shape on the image samplers' code path.

Same ``forward(x_t, t, cond)`` contract and cond convention (``y``, ``emb``, ``drop``) as the U-Net,
so the DDPM / DDIM / DPM-Solver++ samplers and the guidances drive it unchanged.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import ConfigDict, Field
from torch import Tensor, nn

from genzoo.nn.embeddings import DenoiserConditions, condition_embedding, timestep_embedding
from genzoo.registry import component


class MLPDenoiserConfig(DenoiserConditions):
    model_config = ConfigDict(extra="forbid")
    dim: int | None = Field(
        None, ge=1, description="vector size D; None takes the product of the dataset's image shape"
    )
    hidden: int = Field(256, ge=8, description="width of the residual blocks")
    depth: int = Field(3, ge=1, description="number of residual blocks")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout in the blocks")


class Block(nn.Module):
    """Pre-norm residual MLP block; the embedding is added before the nonlinearity (a 1-D ADM ResBlock)."""

    def __init__(self, hidden: int, dropout: float) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = (
            nn.LayerNorm(hidden),
            nn.Linear(hidden, 2 * hidden),
            nn.Linear(2 * hidden, hidden),
        )
        self.emb, self.drop = nn.Linear(hidden, hidden), nn.Dropout(dropout)
        nn.init.zeros_(self.fc2.weight)  # each block starts as the identity, as ADM's zero-initialised convs
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc2(self.drop(F.silu(self.fc1(self.norm(h) + self.emb(emb)))))


class MLPDenoiser(nn.Module):
    """``forward(x_t (B, D), t, cond) -> (B, D)``, or (B, 2D) ``[eps, v]`` with learned sigma.

    Inputs of any shape (B, ...) are flattened and the output is reshaped to (B, k*C, ...), so it
    also stands in for a U-Net on tiny images.
    """

    def __init__(self, cfg: MLPDenoiserConfig) -> None:
        super().__init__()
        if cfg.dim is None:
            raise ValueError("MLPDenoiserConfig: dim must be set (or built for a dataset)")
        self.cfg = cfg
        h = cfg.hidden
        self.inp = nn.Linear(cfg.dim, h)
        self.time_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.class_emb = nn.Embedding(cfg.num_classes + 1, h) if cfg.num_classes else None
        self.emb_proj = nn.Linear(cfg.emb_dim_in, h) if cfg.emb_dim_in else None
        self.null_emb = nn.Parameter(torch.zeros(cfg.emb_dim_in)) if cfg.emb_dim_in else None
        self.blocks = nn.ModuleList(Block(h, cfg.dropout) for _ in range(cfg.depth))
        self.out = nn.Sequential(nn.LayerNorm(h), nn.Linear(h, cfg.dim * (2 if cfg.learn_sigma else 1)))
        nn.init.zeros_(self.out[1].weight)  # a fresh denoiser predicts exactly 0
        nn.init.zeros_(self.out[1].bias)

    def forward(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.cfg.hidden).to(x.dtype))
        emb = condition_embedding(
            emb, cond or {}, class_emb=self.class_emb, emb_proj=self.emb_proj, null_emb=self.null_emb
        )
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, emb)
        out = self.out(h)
        return out.view(x.shape[0], -1, *x.shape[2:]) if x.dim() > 2 else out


@component("network", "mlp-denoiser", config=MLPDenoiserConfig)
def build_mlp_denoiser(cfg: MLPDenoiserConfig, ctx: Any = None) -> MLPDenoiser:
    """An MLP denoiser for flat data (embeddings, 2-D toy data) with a timestep embedding.

    Build for a dataset: ``dim`` defaults to the product of the data's image shape.
    """
    data = getattr(ctx, "data", None)
    if cfg.dim is None and data is not None:
        cfg = cfg.model_copy(update={"dim": math.prod(data.image_shape)})
    return MLPDenoiser(cfg)
