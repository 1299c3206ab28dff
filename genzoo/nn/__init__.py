"""Networks shared by the families: the ADM U-Net, an MLP denoiser for vectors, a noisy classifier."""

from genzoo.nn.classifier import NoisyClassifier, NoisyClassifierConfig, build_noisy_classifier
from genzoo.nn.mlp import MLPDenoiser, MLPDenoiserConfig, build_mlp_denoiser
from genzoo.nn.unet import UNet, UNetConfig, build_unet

NETWORKS = {
    "unet": (UNetConfig, build_unet),
    "mlp-denoiser": (MLPDenoiserConfig, build_mlp_denoiser),
    "noisy-classifier": (NoisyClassifierConfig, build_noisy_classifier),
}

__all__ = ["NETWORKS", "UNet", "UNetConfig", "MLPDenoiser", "MLPDenoiserConfig", "NoisyClassifier", "NoisyClassifierConfig"]
