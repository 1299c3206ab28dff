"""The families before diffusion: DCGAN, AE / denoising AE, VAE and VQ-VAE (see docs/classic.md)."""
