"""Bundled datasets (no download) and the text tokenizer; see docs/data.md."""

from genzoo.data.base import DataSpec, TensorImageDataset
from genzoo.data.digits import DigitsConfig, make_digits
from genzoo.data.imagefolder import ImageFolderConfig, TorchvisionConfig, make_imagefolder, make_torchvision
from genzoo.data.shapes import ShapesConfig, make_shapes

DATASETS = {
    "shapes": (ShapesConfig, make_shapes),
    "digits": (DigitsConfig, make_digits),
    "imagefolder": (ImageFolderConfig, make_imagefolder),
    "torchvision": (TorchvisionConfig, make_torchvision),
}

__all__ = ["DATASETS", "DataSpec", "TensorImageDataset"]
