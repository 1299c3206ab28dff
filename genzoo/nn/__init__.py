"""Networks shared by the families: the ADM U-Net, an MLP denoiser, a GPT, a noisy classifier, conv nets."""

import torch

from genzoo.nn.classifier import NoisyClassifier, NoisyClassifierConfig
from genzoo.nn.embeddings import timestep_embedding
from genzoo.nn.gpt import GPT, CachedLogits, GPTConfig, KVCache, TransformerSize
from genzoo.nn.mlp import MLPDenoiser, MLPDenoiserConfig, build_mlp_denoiser
from genzoo.nn.unet import UNet, UNetConfig, build_unet, unet_flops

# Convolution weights stored NHWC for inference (genzoo.api.for_inference) and, with train.channels_last, for
# training: the U-Net forward measured 1.08-1.15x and its training step 1.02-1.09x against NCHW on CPU
# (benchmarks/results.md). Activations follow the weights' layout; checkpoints are saved NCHW.
CONV_MEMORY_FORMAT = torch.channels_last

__all__ = [
    "CONV_MEMORY_FORMAT",
    "CachedLogits",
    "GPT",
    "GPTConfig",
    "KVCache",
    "MLPDenoiser",
    "MLPDenoiserConfig",
    "NoisyClassifier",
    "NoisyClassifierConfig",
    "TransformerSize",
    "UNet",
    "UNetConfig",
    "build_mlp_denoiser",
    "build_unet",
    "timestep_embedding",
    "unet_flops",
]
