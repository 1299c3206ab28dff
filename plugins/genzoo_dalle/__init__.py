"""Built-in plugin: DALL·E (Ramesh et al. 2021): the dVAE tokenizer, BPE text tokens, the transformer
over [text; image] tokens, and the `dalle` pipeline (the token pipeline with captions and CLIP reranking)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import dvae, pipeline, transformer

    registry.register_module(dvae, transformer, pipeline)
