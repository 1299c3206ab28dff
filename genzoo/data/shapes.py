"""``shapes``: procedural captioned images with known attributes, for measuring what a model learned.

Each image shows one shape (4 kinds) of one colour (6) and size (2) at one of 3x3 positions on a
black background, with jitter of position, size and shade, anti-aliased by 4x4 supersampling.
The label is ``shape * 6 + colour`` (24 classes). Four colour x shape pairs (``HELDOUT``) never
appear in ``train`` or ``test``; the ``heldout`` split holds only them, to measure compositional
generalisation: a text-conditional model must combine a colour and a shape it saw only apart.
"""

from __future__ import annotations

import re
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.data.base import DataSpec, TensorImageDataset, dataset, fingerprint_of

VERSION = 1
SPLITS = ("train", "test", "heldout")
SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top centre",
    "top right",
    "centre left",
    "centre",
    "centre right",
    "bottom left",
    "bottom centre",
    "bottom right",
)
ATTRIBUTES = {"shape": SHAPES, "colour": COLOURS, "size": SIZES, "position": POSITIONS}
HELDOUT = (("red", "triangle"), ("green", "cross"), ("blue", "circle"), ("yellow", "square"))
RGB = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1]], dtype=torch.float32)
SIZE_WORDS = {"small": ("small", "little"), "large": ("large", "big")}
PHRASINGS = (
    "a {size} {colour} {shape} in the {position}",
    "{position}: a {size} {colour} {shape}",
    "a {colour} {shape}, {size}, at the {position}",
    "there is a {size} {colour} {shape} in the {position}",
)
_SPLIT_OFFSET = {"train": 0, "test": 1_000_003, "heldout": 2_000_003}
_SUPERSAMPLE = 4


class ShapesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    image_size: Literal[16, 32, 64] = Field(32, description="side in pixels: 16, 32 or 64")
    num_train: int = Field(10_000, ge=1, description="images in the train split")
    num_test: int = Field(2_000, ge=1, description="images in the test and in the heldout split")
    seed: int = Field(0, description="seed; the same seed gives bitwise the same images")
    heldout: bool = Field(True, description="keep the HELDOUT colour x shape pairs out of train and test")


def caption(attrs: tuple[int, int, int, int], phrasing: int, synonym: int = 0) -> str:
    shape, colour, size, position = attrs
    return PHRASINGS[phrasing].format(
        size=SIZE_WORDS[SIZES[size]][synonym], colour=COLOURS[colour], shape=SHAPES[shape], position=POSITIONS[position]
    )


def parse_caption(text: str) -> dict[str, int | None]:
    """Recover the attribute indices a caption names (None for an attribute it does not name)."""
    text = " " + re.sub(r"[^a-z ]", " ", text.lower()) + " "
    out: dict[str, int | None] = {}
    for name, values in (("shape", SHAPES), ("colour", COLOURS)):
        out[name] = next((i for i, v in enumerate(values) if f" {v} " in text), None)
    out["size"] = next((i for i, s in enumerate(SIZES) if any(f" {w} " in text for w in SIZE_WORDS[s])), None)
    # longest names first, so "top left" is not read as "top centre"'s neighbour or as "centre"
    by_length = sorted(range(len(POSITIONS)), key=lambda i: -len(POSITIONS[i]))
    out["position"] = next((i for i in by_length if f" {POSITIONS[i]} " in text), None)
    return out


def _draw_attributes(n: int, split: str, cfg: ShapesConfig, g: torch.Generator) -> Tensor:
    """(n, 4) attribute indices: uniform, restricted to (train/test) or excluding (heldout) HELDOUT pairs."""
    held = torch.zeros(len(SHAPES), len(COLOURS), dtype=torch.bool)
    for colour, shape in HELDOUT:
        held[SHAPES.index(shape), COLOURS.index(colour)] = True
    if split == "heldout":
        allowed = held
    else:
        allowed = ~held if cfg.heldout else torch.ones_like(held)
    pairs = allowed.nonzero()  # (P, 2): shape, colour
    pick = pairs[torch.randint(len(pairs), (n,), generator=g)]
    size = torch.randint(len(SIZES), (n, 1), generator=g)
    position = torch.randint(len(POSITIONS), (n, 1), generator=g)
    return torch.cat([pick, size, position], dim=1)


def render(attrs: Tensor, size: int, g: torch.Generator) -> Tensor:
    """Images (n, 3, size, size) in [-1, 1] for attribute rows (shape, colour, size, position)."""
    n = attrs.shape[0]
    s = size * _SUPERSAMPLE
    coords = (torch.arange(s, dtype=torch.float32) + 0.5) / s  # sub-pixel centres in [0, 1]
    yy, xx = coords.view(1, s, 1), coords.view(1, 1, s)
    col, row = attrs[:, 3] % 3, attrs[:, 3] // 3
    grid = torch.tensor([0.22, 0.5, 0.78])
    cx = grid[col] + (torch.rand(n, generator=g) - 0.5) * 0.06
    cy = grid[row] + (torch.rand(n, generator=g) - 0.5) * 0.06
    r = torch.where(attrs[:, 2] == 1, 0.19, 0.11) * (1 + (torch.rand(n, generator=g) - 0.5) * 0.16)
    shade = 0.75 + 0.25 * torch.rand(n, generator=g)
    dx = (xx - cx.view(n, 1, 1)) / r.view(n, 1, 1)  # coordinates in units of the radius
    dy = (yy - cy.view(n, 1, 1)) / r.view(n, 1, 1)
    circle = dx**2 + dy**2 <= 1
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85
    triangle = (dy >= -1) & (dy <= 0.8) & (dx.abs() <= (dy + 1) * 0.55)
    cross = ((dx.abs() <= 0.3) & (dy.abs() <= 1)) | ((dy.abs() <= 0.3) & (dx.abs() <= 1))
    masks = torch.stack([circle, square, triangle, cross], dim=1)  # (n, 4, s, s)
    mask = masks[torch.arange(n), attrs[:, 0]].float()
    coverage = torch.nn.functional.avg_pool2d(mask.unsqueeze(1), _SUPERSAMPLE)  # anti-aliasing
    colour = RGB[attrs[:, 1]] * shade.unsqueeze(1)
    return coverage * colour.view(n, 3, 1, 1) * 2 - 1


@dataset("shapes", config=ShapesConfig)
def make_shapes(cfg: ShapesConfig, split: str) -> TensorImageDataset:
    """Procedural captioned shapes; label = shape * 6 + colour."""
    if split not in SPLITS:
        raise ValueError(f"shapes has splits {SPLITS}, not '{split}'")
    n = cfg.num_train if split == "train" else cfg.num_test
    g = torch.Generator().manual_seed(cfg.seed * 7_919 + _SPLIT_OFFSET[split])
    attrs = _draw_attributes(n, split, cfg, g)
    chunks = [render(attrs[i : i + 1024], cfg.image_size, g) for i in range(0, n, 1024)]
    phrasing = torch.randint(len(PHRASINGS), (n,), generator=g).tolist()
    synonym = torch.randint(2, (n,), generator=g).tolist()
    captions = [caption(tuple(a), p, s) for a, p, s in zip(attrs.tolist(), phrasing, synonym)]
    spec = DataSpec(
        name="shapes",
        image_shape=(3, cfg.image_size, cfg.image_size),
        num_classes=len(SHAPES) * len(COLOURS),
        has_captions=True,
        attributes={k: tuple(v) for k, v in ATTRIBUTES.items()},
        class_names=tuple(f"{c} {s}" for s in SHAPES for c in COLOURS),
    )
    tensors = {
        "image": torch.cat(chunks).contiguous(),
        "label": attrs[:, 0] * len(COLOURS) + attrs[:, 1],
        "attributes": attrs,
        "caption": captions,
    }
    return TensorImageDataset(spec, tensors, fingerprint_of("shapes", VERSION, cfg.model_dump(), split))


def heldout_pairs() -> list[tuple[int, int]]:
    """The held-out (shape, colour) index pairs."""
    return [(SHAPES.index(s), COLOURS.index(c)) for c, s in HELDOUT]
