"""The ``dalle`` pipeline (Ramesh et al. 2021): the token pipeline with captions and CLIP reranking (Sec. 2.5)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from genzoo.pipelines import Conditioning, TokenPipeline, make_token_pipeline
from genzoo.registry import component


class DalleConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    condition: Conditioning = Field(
        Conditioning.caption, description="caption (through the encoder's tokens), class or none"
    )
    rerank: int = Field(
        1,
        ge=1,
        description="draw this many candidates per prompt and keep the one the recipe's CLIP "
        "scores highest against the caption (DALL·E Sec. 2.5); 1: no reranking",
    )


@component("pipeline", "dalle", config=DalleConfig)
def make_dalle_pipeline(cfg: DalleConfig, ctx) -> TokenPipeline:
    """DALL·E (Ramesh et al. 2021): a tokenizer, the transformer over [text; image] tokens, optional CLIP reranking."""
    return make_token_pipeline("dalle", cfg.condition, ctx, rerank=cfg.rerank)
