"""Built-in plugin: the shared pieces the families compose: priors, networks, token sampling, text transformer, CLIP."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo import priors, tokens
    from genzoo.nn import classifier, convnets, mlp, timm_models, unet
    from genzoo.text import clip, transformer
    from genzoo.training import loggers

    registry.register_module(priors, tokens, unet, mlp, classifier, convnets, timm_models, transformer, clip, loggers)
