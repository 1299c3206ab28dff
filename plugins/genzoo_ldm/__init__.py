"""Built-in plugin: latent diffusion (Rombach et al. 2022) as a composition of a first-stage autoencoder and the
shared diffusion decoder (docs/diffusion.md, "Latent diffusion")."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import ldm

    registry.register(
        "decoder", "latent-diffusion", config=ldm.LatentDiffusionConfig, factory=ldm.make_latent_diffusion
    )
    registry.register(
        "pipeline",
        "latent-diffusion",
        config=ldm.LatentDiffusionPipelineConfig,
        factory=ldm.make_latent_diffusion_pipeline,
    )
