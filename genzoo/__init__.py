"""genzoo: a plugin-based zoo of generative image models, from GANs to DALL·E 2."""

__version__ = "0.1.0"
