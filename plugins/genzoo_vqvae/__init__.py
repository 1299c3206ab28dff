"""Built-in plugin: VQ-VAE (van den Oord et al. 2017) with an autoregressive (GPT) or uniform prior over codes."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import vqvae

    registry.register_module(vqvae)
