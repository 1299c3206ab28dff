"""Built-in plugin: guidance by a reference image, at the three levels the lineage names (docs/guidance.md):

* ``pixel``: ILVR (Choi et al. 2021): after every step the low-pass of x_{t-1} is replaced by the reference's,
  noised to the same level;
* ``feature``: the gradient of the cosine similarity between a frozen network's features of x0_hat and of the
  reference (a timm model by name, from scratch or pretrained, or the recipe's CLIP image tower);
* ``style``: the gradient of the Gram-matrix distance (Gatys et al. 2016) between a frozen network's feature maps of
  x0_hat and of a style image.

Each works with every diffusion sampler: ``pixel`` through the samplers' ``after_step`` hook, ``feature`` and
``style`` through ``GradientGuidance``'s mean and eps forms.
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from . import features, ilvr

    registry.register_module(ilvr, features)
