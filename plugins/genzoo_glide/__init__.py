"""Built-in plugin: GLIDE (Nichol et al. 2021): CLIP guidance. GLIDE itself is the diffusion pipeline with
``condition: caption`` and the shared text transformer; see docs/text.md."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import clip_guidance

    registry.register_module(clip_guidance)
