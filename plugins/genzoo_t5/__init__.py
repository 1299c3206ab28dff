"""Built-in plugin: a frozen pretrained language model as the text encoder (Imagen, Saharia et al. 2022): the ``t5``
encoder wraps a transformers text encoder by name (docs/text.md).

Needs the optional extra: ``pip install 'genzoo[t5]'`` (transformers, sentencepiece). Without it the hook raises
ImportError, which ``genzoo plugins`` reports, and every other plugin loads. transformers itself is imported only when
the encoder is built.
"""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl, require_extra

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    require_extra("t5", "transformers", "t5")
    from . import encoder

    registry.register_module(encoder)
