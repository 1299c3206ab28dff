"""genzoo: a plugin-based zoo of generative image models, from GANs to DALL·E 2.

>>> import genzoo
>>> model = genzoo.create_model("ddpm-shapes")   # untrained, from a recipe name  # doctest: +SKIP
>>> model = genzoo.load_model("runs/ddpm")       # a trained run                  # doctest: +SKIP
>>> images = model.sample(16)                                                     # doctest: +SKIP
"""

__version__ = "0.1.0"

# The one-call API, imported on first use: plugins import this package for its version, and the API
# imports the plugins' registry (and torch).
_API = ("create_model", "load_model", "import_model", "list_recipes", "list_components", "resolve_recipe")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from genzoo import api

        return getattr(api, name)
    raise AttributeError(f"module 'genzoo' has no attribute {name!r}")
