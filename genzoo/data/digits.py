"""scikit-learn's bundled handwritten digits (Alpaydin & Kaynak 1998): 1,797 real 8x8 images, no download."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from genzoo.data.base import DataSpec, TensorImageDataset, dataset, fingerprint_of, resize, to_unit_range

VERSION = 1
SPLITS = ("train", "test")


class DigitsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: Literal[8, 16, 32] = Field(8, description="8 (native) or bilinearly resized to 16 or 32")
    num_test: int = Field(297, ge=1, le=897, description="images held out as the test split (the rest train)")
    split_seed: int = Field(0, description="seed of the fixed train/test permutation")


@dataset("digits", config=DigitsConfig)
def make_digits(cfg: DigitsConfig, split: str) -> TensorImageDataset:
    """Handwritten digits 0-9 as 1-channel images in [-1, 1]; label = the digit."""
    from sklearn.datasets import load_digits

    if split not in SPLITS:
        raise ValueError(f"digits has splits {SPLITS}, not '{split}'")
    raw = load_digits()
    images = torch.tensor(raw.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(raw.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.split_seed))
    idx = order[: cfg.num_test] if split == "test" else order[cfg.num_test :]
    images = to_unit_range(resize(images[idx], cfg.image_size))
    labels = labels[idx]
    spec = DataSpec(
        name="digits",
        image_shape=(1, cfg.image_size, cfg.image_size),
        num_classes=10,
        has_captions=True,
        class_names=tuple(str(d) for d in range(10)),
    )
    captions = [f"a handwritten digit {int(d)}" for d in labels]
    tensors = {"image": images.contiguous(), "label": labels, "caption": captions}
    return TensorImageDataset(spec, tensors, fingerprint_of("digits", VERSION, cfg.model_dump(), split))
