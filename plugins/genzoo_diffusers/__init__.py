"""Built-in plugin: diffusers interop (docs/interop.md). Adapter components that put a diffusers module behind
genzoo's interfaces (UNet2DModel, UNet2DConditionModel, PriorTransformer networks; VQModel and AutoencoderKL
decoders; transformers' CLIP as a ``clip``; Karlo's prior as a ``prior``), and the ``diffusers`` importer behind
`genzoo import` (DDPMPipeline, DDIMPipeline, LDMPipeline, UnCLIPPipeline).

Needs the optional extra: ``pip install 'genzoo[diffusers]'``. Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads. diffusers itself is imported only when a component is
built or a pipeline imported (importing it costs seconds).
"""

from __future__ import annotations

from pathlib import Path

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("diffusers", "diffusers", "diffusers")
    from . import adapters, importer, unclip

    registry.register_module(adapters, unclip, importer)


@hookimpl
def register_recipes() -> list[str]:
    """The peer recipe (docs/interop.md): genzoo's small shapes DDPM with a UNet2DModel as its denoiser."""
    return [str(Path(__file__).with_name("recipes.yaml"))]
