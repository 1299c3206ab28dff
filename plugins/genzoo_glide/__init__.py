"""Built-in plugin: text conditioning (GLIDE, Nichol et al. 2021): the text transformer, CLIP (genzoo's,
open_clip's, a timm image tower) and CLIP guidance. GLIDE itself is the diffusion pipeline with
``condition: caption``; see docs/text.md."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.diffusion import guidance
    from genzoo.nn import timm_models
    from genzoo.text import clip, transformer

    registry.register("network", "text-transformer", config=transformer.TextTransformerConfig, factory=transformer.build_text_transformer)
    registry.register("network", "timm", config=timm_models.TimmConfig, factory=timm_models.build_timm)
    registry.register("encoder", "text-transformer", config=transformer.TextTransformerConfig, factory=transformer.TextEncoder)
    registry.register("clip", "clip", config=clip.ClipConfig, factory=clip.build_clip)
    registry.register("clip", "open-clip", config=clip.OpenClipConfig, factory=clip.build_open_clip)
    registry.register("pipeline", "clip", config=clip.ClipPipelineConfig, factory=clip.make_clip_pipeline)
    registry.register("guidance", "clip", config=guidance.ClipGuidanceConfig, factory=guidance.make_clip_guidance)
