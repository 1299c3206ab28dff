"""Built-in plugin: latent diffusion (Rombach et al. 2022) as a composition of a first-stage autoencoder and the
shared diffusion decoder (docs/diffusion.md, "Latent diffusion")."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import ldm

    registry.register_module(ldm)
