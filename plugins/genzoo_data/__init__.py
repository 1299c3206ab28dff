"""Built-in plugin: the bundled datasets (shapes, digits, imagefolder, torchvision) and the BPE tokenizer."""

from __future__ import annotations

import genzoo
from genzoo.plugins import hookimpl

__version__ = genzoo.__version__


@hookimpl
def register_components(registry) -> None:
    from genzoo.data import data_source, digits, imagefolder, shapes, tokenizer

    registry.register("dataset", "shapes", config=shapes.ShapesConfig, factory=data_source(shapes.make_shapes))
    registry.register("dataset", "digits", config=digits.DigitsConfig, factory=data_source(digits.make_digits))
    registry.register(
        "dataset",
        "imagefolder",
        config=imagefolder.ImageFolderConfig,
        factory=data_source(imagefolder.make_imagefolder),
    )
    registry.register(
        "dataset",
        "torchvision",
        config=imagefolder.TorchvisionConfig,
        factory=data_source(imagefolder.make_torchvision),
    )
    registry.register("tokenizer", "bpe", config=tokenizer.BPETokenizerConfig, factory=tokenizer.BPETokenizer)
