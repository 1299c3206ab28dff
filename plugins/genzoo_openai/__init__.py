"""Built-in plugin: OpenAI's releases (improved-diffusion, guided-diffusion, glide-text2im) into genzoo's modules.

The ``openai`` importer behind `genzoo import FILE.pt OUT [--classifier CLASSIFIER.pt]` (docs/interop.md), and the
GLIDE components an imported model needs: ``glide-unet`` (genzoo's U-Net with genzoo's text transformer inside it),
``glide-tokens`` (GLIDE's GPT-2 BPE caption tokens) and ``noised-vit`` (its noised CLIP's image encoder). No foreign
library is needed: the layouts were read from the published code and the converter is genzoo's own.
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import clip, glide, importer

    registry.register_module(importer, glide, clip)
