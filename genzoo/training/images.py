"""Sample grids as PNG."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor


def load_image(path: str | Path, *, size: int, channels: int) -> Tensor:
    """A PNG/JPEG file as a (C, size, size) float tensor in [-1, 1] (resized with bicubic filtering)."""
    from PIL import Image, UnidentifiedImageError

    from genzoo.errors import GenzooError

    try:
        img = Image.open(path).convert("L" if channels == 1 else "RGB").resize((size, size), Image.BICUBIC)
    except (OSError, UnidentifiedImageError) as e:
        raise GenzooError(f"could not read image {path}: {e}; pass a PNG or JPEG file") from None
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, channels)
    return x.permute(2, 0, 1).float() / 127.5 - 1


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float (B, C, H, W) -> uint8 (B, H, W, C)."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1)


def grid_image(images: Tensor, nrow: int | None = None, pad: int = 1, min_side: int = 32) -> Tensor:
    """Tile a [-1, 1] batch (B, C, H, W) into one uint8 (H', W', C) image, ``nrow`` images per row (default a
    square); the picture every logger is given (TensorBoard, W&B) and the PNG :func:`save_grid` writes.

    Images smaller than ``min_side`` are enlarged by an integer factor (nearest), so an 8x8 digit
    is visible; the saved raw samples (``--save``) are never resized.
    """
    factor = max(1, min_side // max(images.shape[-2:]))
    if factor > 1:
        images = images.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1)
    x = to_uint8(images)
    b, h, w, c = x.shape
    nrow = nrow or math.ceil(math.sqrt(b))
    rows = math.ceil(b / nrow)
    grid = torch.zeros(rows * (h + pad) + pad, nrow * (w + pad) + pad, c, dtype=torch.uint8)
    for i in range(b):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w] = x[i]
    return grid


def save_png(image: Tensor, path: str | Path) -> Path:
    """Write a uint8 (H, W, C) image (C 1 or 3) as a PNG, creating its folder."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image.numpy()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(path)
    return path


def save_grid(images: Tensor, path: str | Path, nrow: int | None = None, pad: int = 1, min_side: int = 32) -> Path:
    """Tile a batch into one PNG (:func:`grid_image`)."""
    return save_png(grid_image(images, nrow, pad, min_side), path)
