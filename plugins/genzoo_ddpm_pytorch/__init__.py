"""Built-in plugin: lucidrains' denoising-diffusion-pytorch in genzoo (docs/interop.md). Its ``Unet`` as a network
(``ddpm-pytorch-unet``, a denoiser any diffusion decoder can train and sample), the ``ddpm-pytorch`` importer behind
`genzoo import` (its Trainer checkpoints and state dicts), and a peer recipe on shapes (recipes.yaml).

Needs the optional extra: ``pip install 'genzoo[ddpm-pytorch]'``. Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads. The library is imported only when a component is built.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    if importlib.util.find_spec("denoising_diffusion_pytorch") is None:
        raise ImportError(
            "the ddpm_pytorch plugin needs the denoising-diffusion-pytorch package: pip install 'genzoo[ddpm-pytorch]'"
        )
    from . import importer, unet

    registry.register("network", "ddpm-pytorch-unet", config=unet.UnetConfig, factory=unet.build_unet)
    registry.register(
        "importer", "ddpm-pytorch", config=importer.DDPMPytorchImporterConfig, factory=importer.DDPMPytorchImporter
    )


@hookimpl
def register_recipes() -> list[str]:
    return [str(Path(__file__).with_name("recipes.yaml"))]
