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

    registry.register("network", "diffusers-unet2d", config=adapters.UNet2DConfig, factory=adapters.build_unet2d)
    registry.register(
        "network",
        "diffusers-unet2d-condition",
        config=adapters.UNet2DConditionConfig,
        factory=adapters.build_unet2d_condition,
    )
    registry.register(
        "network",
        "diffusers-prior-transformer",
        config=adapters.PriorTransformerConfig,
        factory=adapters.build_prior_transformer,
    )
    registry.register("decoder", "diffusers-vqmodel", config=adapters.ModuleConfig, factory=adapters.build_vqmodel)
    registry.register(
        "decoder",
        "diffusers-autoencoder-kl",
        config=adapters.AutoencoderKLConfig,
        factory=adapters.build_autoencoder_kl,
    )
    registry.register(
        "clip", "diffusers-clip", config=unclip.TransformersClipConfig, factory=unclip.build_transformers_clip
    )
    registry.register(
        "prior", "diffusers-unclip-prior", config=unclip.UnCLIPPriorConfig, factory=unclip.make_unclip_prior
    )
    registry.register(
        "importer", "diffusers", config=importer.DiffusersImporterConfig, factory=importer.DiffusersImporter
    )


@hookimpl
def register_recipes() -> list[str]:
    """The peer recipe (docs/interop.md): genzoo's small shapes DDPM with a UNet2DModel as its denoiser."""
    return [str(Path(__file__).with_name("recipes.yaml"))]
