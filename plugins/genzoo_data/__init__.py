"""Built-in plugin: the bundled datasets (shapes, digits, imagefolder, torchvision) and the BPE tokenizer."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.data import digits, imagefolder, shapes, tokenizer

    registry.register_module(shapes, digits, imagefolder, tokenizer)
