"""Your own images: a folder (class = subfolder) with an optional captions file; torchvision datasets."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from genzoo.data.base import DataSpec, TensorImageDataset, dataset, fingerprint_of, to_unit_range
from genzoo.errors import DataError

SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


class ImageFolderConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    root: str = Field(..., description="folder of images (searched recursively); subfolder names become classes")
    image_size: int = Field(32, ge=4, description="images are resized (short side) and centre-cropped to this")
    channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB)")
    captions: str | None = Field(None, description="JSONL {file, caption} or CSV file,caption; paths relative to root")
    num_test: int = Field(0, ge=0, description="images held out as the test split (a fixed seeded choice)")
    split_seed: int = Field(0, description="seed of the train/test choice")
    skip_bad: bool = Field(
        False,
        description="skip images that cannot be read (a warning counts them) instead of "
        "stopping at the first with its name",
    )


def _read_captions(path: Path) -> dict[str, str]:
    if not path.is_file():
        raise DataError(
            f"imagefolder: captions file {path} does not exist; fix field 'captions' (a path relative to "
            "'root') or drop it"
        )
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), 1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as e:
                raise DataError(
                    f"imagefolder: {path} line {i} is not JSON ({e.msg}); write one {{file, caption}} object per line"
                ) from None
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    else:
        raise DataError(f"imagefolder: captions file {path} must end in .jsonl or .csv; fix field 'captions'")
    if rows and not (isinstance(rows[0], dict) and {"file", "caption"} <= set(rows[0])):
        got = sorted(rows[0]) if isinstance(rows[0], dict) else type(rows[0]).__name__
        raise DataError(f"imagefolder: {path} rows need the keys 'file' and 'caption', got {got}")
    return {str(Path(r["file"])): r["caption"] for r in rows}


def square_image(im, image_size: int, channels: int) -> torch.Tensor:
    """A PIL image resized (short side) and centre-cropped to ``image_size``, as (C, S, S) floats in [0, 1]."""
    from PIL import Image

    im = im.convert("RGB" if channels == 3 else "L")
    scale = image_size / min(im.size)
    size = (max(image_size, round(im.width * scale)), max(image_size, round(im.height * scale)))
    im = im.resize(size, Image.BICUBIC)
    left, top = (im.width - image_size) // 2, (im.height - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(image_size, image_size, channels)
    return x.permute(2, 0, 1).float() / 255


def _read_image(p: Path, cfg: ImageFolderConfig) -> torch.Tensor:
    from PIL import Image

    with Image.open(p) as im:
        im.load()  # decodes the whole file: a truncated one fails here
        return square_image(im, cfg.image_size, cfg.channels)


@dataset("imagefolder", config=ImageFolderConfig)
def make_imagefolder(cfg: ImageFolderConfig, split: str) -> TensorImageDataset:
    """Load, resize and centre-crop every image under ``root`` into memory."""
    root = Path(cfg.root).expanduser()
    if not root.is_dir():
        raise DataError(
            f"imagefolder: field 'root' is {root}, which is not a directory; point data.root at a folder of images"
        )
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in SUFFIXES)
    if not files:
        raise DataError(f"imagefolder: no images ({', '.join(sorted(SUFFIXES))}) under {root}; fix field 'root'")
    classes = sorted({p.parent.relative_to(root).as_posix() for p in files} - {"."})
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(cfg.split_seed)).tolist()
    chosen = order[: cfg.num_test] if split == "test" else order[cfg.num_test :]
    if split not in ("train", "test"):
        raise DataError(f"imagefolder has splits ('train', 'test'), not '{split}'")
    captions = _read_captions(root / cfg.captions) if cfg.captions else None
    images, labels, texts, skipped = [], [], [], []
    for i in sorted(chosen):
        p = files[i]
        rel = p.relative_to(root)
        try:
            x = _read_image(p, cfg)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's errors for unknown, corrupt and truncated files
            if not cfg.skip_bad:
                raise DataError(
                    f"imagefolder: {p} cannot be read as an image ({type(e).__name__}: {e}); fix or "
                    "remove it, or set data.skip_bad=true to skip unreadable images"
                ) from None
            skipped.append(rel.as_posix())
            continue
        images.append(x)
        labels.append(classes.index(rel.parent.as_posix()) if rel.parent.as_posix() in classes else 0)
        if captions is not None:
            if rel.as_posix() not in captions:
                raise DataError(f"imagefolder: {cfg.captions} has no caption for {rel.as_posix()}; add one")
            texts.append(captions[rel.as_posix()])
    if skipped:  # the user asked for it: a warning, and the count on the dataset
        print(
            f"imagefolder: warning: skipped {len(skipped)} unreadable image(s) of the {split} split under {root}: "
            f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}",
            file=sys.stderr,
        )
    if not images:
        raise DataError(f"imagefolder: none of the {len(chosen)} images of the {split} split under {root} can be read")
    spec = DataSpec(
        name="imagefolder",
        image_shape=(cfg.channels, cfg.image_size, cfg.image_size),
        num_classes=len(classes) or None,
        has_captions=captions is not None,
        class_names=tuple(classes),
    )
    tensors = {"image": to_unit_range(torch.stack(images)), "label": torch.tensor(labels, dtype=torch.long)}
    if captions is not None:
        tensors["caption"] = texts
    ds = TensorImageDataset(
        spec, tensors, fingerprint_of("imagefolder", cfg.model_dump(), split, [str(f) for f in files], skipped)
    )
    ds.skipped = skipped
    return ds


class TorchvisionConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Literal["MNIST", "CIFAR10"] = Field("MNIST", description="torchvision dataset class")
    root: str = Field("~/.cache/genzoo/torchvision", description="where the files are (or are downloaded to)")
    download: bool = Field(False, description="download when missing (needs the network)")
    image_size: int | None = Field(None, description="resize to this side; None keeps 28 (MNIST) or 32 (CIFAR-10)")


@dataset("torchvision", config=TorchvisionConfig)
def make_torchvision(cfg: TorchvisionConfig, split: str) -> TensorImageDataset:
    """MNIST or CIFAR-10 through torchvision, held in memory."""
    try:
        import torchvision
    except ImportError:
        raise DataError("dataset 'torchvision' needs torchvision: pip install torchvision") from None
    root = Path(cfg.root).expanduser()
    try:
        ds = getattr(torchvision.datasets, cfg.name)(str(root), train=split == "train", download=cfg.download)
    except RuntimeError as e:
        hint = "set download: true" if not cfg.download else "check the network, or place the files there by hand"
        raise DataError(f"torchvision {cfg.name}: not found under {root} ({e}); {hint}") from None
    except OSError as e:
        raise DataError(
            f"torchvision {cfg.name}: could not download to {root} ({e}); no network? place the files there by hand"
        ) from None
    data = torch.as_tensor(ds.data)
    x = data.unsqueeze(1) if data.dim() == 3 else data.permute(0, 3, 1, 2)
    x = x.float() / 255
    if cfg.image_size:
        from genzoo.data.base import resize

        x = resize(x, cfg.image_size)
    classes = tuple(ds.classes)
    spec = DataSpec(
        name=f"torchvision-{cfg.name}", image_shape=tuple(x.shape[1:]), num_classes=len(classes), class_names=classes
    )
    tensors = {"image": to_unit_range(x), "label": torch.as_tensor(ds.targets, dtype=torch.long)}
    return TensorImageDataset(spec, tensors, fingerprint_of("torchvision", cfg.model_dump(), split))
