"""Built-in plugin: DDPM, Improved DDPM and ADM: the diffusion decoder, its samplers and guidances."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.diffusion import decoder, guidance, samplers

    registry.register("decoder", "diffusion-decoder", config=decoder.DiffusionDecoderConfig, factory=decoder.make_diffusion_decoder)
    registry.register("pipeline", "diffusion", config=decoder.DiffusionPipelineConfig, factory=decoder.make_diffusion_pipeline)
    for name, cls in samplers.SAMPLERS.items():
        registry.register("sampler", name, config=cls.Config, factory=cls)
    for name, (config, factory) in guidance.GUIDANCES.items():
        registry.register("guidance", name, config=config, factory=factory)
