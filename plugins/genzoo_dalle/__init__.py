"""Built-in plugin: DALL·E (Ramesh et al. 2021): the dVAE tokenizer, BPE text tokens, the transformer
over [text; image] tokens, and the `dalle` pipeline (the token pipeline with captions and CLIP reranking)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import dvae, pipeline, transformer

    registry.register("decoder", "dvae", config=dvae.DiscreteVAEConfig, factory=dvae.make_dvae)
    registry.register("encoder", "bpe-tokens", config=transformer.BPETokensConfig, factory=transformer.BPETokensEncoder)
    registry.register(
        "prior",
        "dalle-transformer",
        config=transformer.DalleTransformerConfig,
        factory=transformer.make_dalle_transformer,
    )
    registry.register("pipeline", "dalle", config=pipeline.DalleConfig, factory=pipeline.make_dalle_pipeline)
