"""Built-in plugin: DDPM, Improved DDPM and ADM: the diffusion decoder, its samplers and guidances."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.diffusion import decoder, guidance, samplers, solvers

    registry.register(
        "decoder", "diffusion-decoder", config=decoder.DiffusionDecoderConfig, factory=decoder.make_diffusion_decoder
    )
    registry.register(
        "pipeline", "diffusion", config=decoder.DiffusionPipelineConfig, factory=decoder.make_diffusion_pipeline
    )
    registry.register("sampler", "ddpm", config=samplers.SamplerConfig, factory=samplers.AncestralSampler)
    registry.register("sampler", "ddim", config=samplers.DDIMConfig, factory=samplers.DDIMSampler)
    registry.register("sampler", "dpm-solver++", config=samplers.SamplerConfig, factory=samplers.DPMSolverPlusPlus2M)
    registry.register("sampler", "edm-heun", config=solvers.EDMHeunConfig, factory=solvers.EDMHeun)
    registry.register("sampler", "dpmpp-3m", config=solvers.MultistepConfig, factory=solvers.DPMSolverPlusPlus3M)
    registry.register("sampler", "dpmpp-3m-sde", config=solvers.SDEConfig, factory=solvers.DPMSolverPlusPlus3MSDE)
    registry.register("sampler", "unipc", config=solvers.UniPCConfig, factory=solvers.UniPC)
    registry.register(
        "guidance", "classifier", config=guidance.ClassifierGuidanceConfig, factory=guidance.make_classifier_guidance
    )
    registry.register("guidance", "cfg", config=guidance.CFGConfig, factory=guidance.ClassifierFreeGuidance)
