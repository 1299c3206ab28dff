"""Built-in plugin: DDPM, Improved DDPM and ADM: the diffusion decoder, its samplers and guidances."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.diffusion import decoder, guidance, samplers, solvers

    registry.register_module(decoder, samplers, solvers, guidance)
