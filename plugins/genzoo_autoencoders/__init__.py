"""Built-in plugin: AE, denoising AE (Vincent et al. 2008) and VAE (Kingma & Welling 2014)."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import autoencoder as ae

    registry.register_module(ae)
