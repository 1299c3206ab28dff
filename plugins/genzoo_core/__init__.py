"""Built-in plugin: the shared pieces the families compose: priors, networks, token sampling, text transformer, CLIP."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo import priors, tokens
    from genzoo.nn import classifier, convnets, mlp, timm_models, unet
    from genzoo.text import clip, transformer
    from genzoo.training import loggers

    registry.register("prior", "gaussian", config=priors.GaussianPriorConfig, factory=priors.make_gaussian_prior)
    registry.register(
        "prior", "fitted-gaussian", config=priors.FittedGaussianConfig, factory=priors.make_fitted_gaussian
    )
    registry.register("prior", "gmm", config=priors.GMMConfig, factory=priors.make_gmm)
    registry.register("prior", "uniform-tokens", config=priors.UniformTokensConfig, factory=priors.make_uniform_tokens)
    registry.register("prior", "gpt", config=priors.GPTPriorConfig, factory=priors.make_gpt_prior)
    registry.register("sampler", "token", config=tokens.TokenSamplerConfig, factory=tokens.TokenSampler)
    registry.register("guidance", "logit-cfg", config=tokens.LogitCFGConfig, factory=tokens.LogitCFG)
    registry.register("network", "unet", config=unet.UNetConfig, factory=unet.build_unet)
    registry.register("network", "mlp-denoiser", config=mlp.MLPDenoiserConfig, factory=mlp.build_mlp_denoiser)
    registry.register(
        "network",
        "noisy-classifier",
        config=classifier.NoisyClassifierConfig,
        factory=classifier.build_noisy_classifier,
    )
    registry.register("network", "conv-encoder", config=convnets.ConvNetConfig, factory=convnets.build_conv_encoder)
    registry.register("network", "conv-decoder", config=convnets.ConvNetConfig, factory=convnets.build_conv_decoder)
    registry.register("network", "grid-encoder", config=convnets.GridNetConfig, factory=convnets.build_grid_encoder)
    registry.register("network", "grid-decoder", config=convnets.GridNetConfig, factory=convnets.build_grid_decoder)
    registry.register("network", "timm", config=timm_models.TimmConfig, factory=timm_models.build_timm)
    registry.register(
        "network",
        "text-transformer",
        config=transformer.TextTransformerConfig,
        factory=transformer.build_text_transformer,
    )
    registry.register(
        "encoder", "text-transformer", config=transformer.TextTransformerConfig, factory=transformer.TextEncoder
    )
    registry.register("encoder", "clip-text", config=clip.ClipTextEncoderConfig, factory=clip.ClipTextEncoder)
    registry.register("encoder", "text-pair", config=clip.TextPairConfig, factory=clip.build_text_pair)
    registry.register("clip", "clip", config=clip.ClipConfig, factory=clip.build_clip)
    registry.register("clip", "open-clip", config=clip.OpenClipConfig, factory=clip.build_open_clip)
    registry.register("pipeline", "clip", config=clip.ClipPipelineConfig, factory=clip.make_clip_pipeline)
    registry.register("logger", "jsonl", config=loggers.JsonlConfig, factory=loggers.JsonlLogger)
