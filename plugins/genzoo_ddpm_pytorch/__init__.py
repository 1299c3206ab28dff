"""Built-in plugin: lucidrains' denoising-diffusion-pytorch in genzoo (docs/interop.md). Its ``Unet`` as a network
(``ddpm-pytorch-unet``, a denoiser any diffusion decoder can train and sample), the ``ddpm-pytorch`` importer behind
`genzoo import` (its Trainer checkpoints and state dicts), and a peer recipe on shapes (recipes.yaml).

Needs the optional extra: ``pip install 'genzoo[ddpm-pytorch]'``. Without it the hook raises ImportError, which
``genzoo plugins`` reports, and every other plugin loads. The library is imported only when a component is built.
"""

from __future__ import annotations

from pathlib import Path

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("ddpm_pytorch", "denoising_diffusion_pytorch", "ddpm-pytorch", package="denoising-diffusion-pytorch")
    from . import importer, unet

    registry.register_module(unet, importer)


@hookimpl
def register_recipes() -> list[str]:
    return [str(Path(__file__).with_name("recipes.yaml"))]
