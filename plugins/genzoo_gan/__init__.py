"""Built-in plugin: DCGAN (Radford et al. 2016), unconditional and class-conditional."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import gan

    registry.register("decoder", "generator", config=gan.GeneratorConfig, factory=gan.make_generator)
    registry.register("pipeline", "gan", config=gan.GANPipelineConfig, factory=gan.make_gan_pipeline)
