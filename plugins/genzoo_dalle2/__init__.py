"""Built-in plugin: DALL·E 2 / unCLIP (Ramesh et al. 2022): the diffusion and
autoregressive priors over CLIP image embeddings, and the `dalle2` pipeline (decoder and upsampler are
the shared diffusion decoder). See docs/dalle2.md."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import pipeline, prior

    registry.register_module(prior, pipeline)
