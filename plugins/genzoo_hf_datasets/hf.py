"""A Hugging Face dataset (by Hub id or local path) as images in [-1, 1] with labels or captions.

The decoded, resized tensors of each split are cached as safetensors under ``$GENZOO_CACHE/hf-datasets`` (keyed
by the config and the dataset's own fingerprint), so a dataset is decoded once, and a cached one loads offline.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file

from genzoo.checkpoint import write_atomic
from genzoo.data import DataSpec, TensorImageDataset, dataset
from genzoo.data.base import fingerprint_of, to_unit_range
from genzoo.data.imagefolder import square_image
from genzoo.errors import DataError, OfflineError
from genzoo.eval.judges import cache_dir


class HFDatasetConfig(BaseModel):
    """A Hugging Face dataset: a Hub id (``cifar10``, ``owner/name``) or a local folder saved with ``save_to_disk``."""

    model_config = ConfigDict(extra="forbid")
    path: str = Field(..., description="Hub dataset id, or a local directory written by Dataset(Dict).save_to_disk")
    name: str | None = Field(None, description="the Hub dataset's configuration name, if it has several")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit)")
    image_column: str = Field("image", description="column holding the images (PIL images or image files)")
    label_column: str | None = Field(None, description="integer class column (a ClassLabel gives the class names)")
    caption_column: str | None = Field(None, description="caption column (text), for caption-conditional models")
    train_split: str = Field("train", description="the dataset's split used as genzoo's train split")
    test_split: str | None = Field(
        "test",
        description="the dataset's split used as genzoo's test split; None: "
        "carve `num_test` items out of the train split",
    )
    num_test: int = Field(0, ge=0, description="with test_split None: items held out of train as the test split")
    limit: int | None = Field(None, ge=1, description="at most this many items per split (the first ones)")
    image_size: int = Field(32, ge=4, description="images are resized (short side) and centre-cropped to this")
    channels: Literal[1, 3] = Field(3, description="1 (grey) or 3 (RGB)")


def _load(cfg: HFDatasetConfig, split: str) -> Any:
    import datasets

    local = Path(cfg.path).expanduser()
    try:
        if local.is_dir() and ((local / "dataset_dict.json").exists() or (local / "dataset_info.json").exists()):
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise DataError(
                        f"hf-dataset: {local} has splits {sorted(ds)}, not '{split}'; fix field "
                        "'train_split' or 'test_split'"
                    )
                ds = ds[split]
            return ds
        return datasets.load_dataset(cfg.path, cfg.name, split=split, revision=cfg.revision)
    except DataError:
        raise
    except (ConnectionError, TimeoutError, OSError) as e:
        if local.exists():
            raise DataError(f"hf-dataset: cannot read {local} ({type(e).__name__}: {str(e)[:120]})") from None
        raise OfflineError(
            f"hf-dataset: '{cfg.path}' is not cached and the Hugging Face Hub cannot be reached "
            f"({type(e).__name__}); download it once with a network (it is cached), or set field "
            "'path' to a directory written by save_to_disk"
        ) from None
    except ValueError as e:  # an unknown split or configuration
        raise DataError(
            f"hf-dataset: '{cfg.path}': {str(e).splitlines()[0][:200]}; fix field 'train_split', 'test_split' or 'name'"
        ) from None


def _tensors(cfg: HFDatasetConfig, ds: Any) -> dict[str, Any]:
    missing = [c for c in (cfg.image_column, cfg.label_column, cfg.caption_column) if c and c not in ds.column_names]
    if missing:
        raise DataError(f"hf-dataset: '{cfg.path}' has no column {missing[0]!r}; its columns are {ds.column_names}")
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    from PIL import Image

    images = []
    for item in ds[cfg.image_column]:
        im = item if isinstance(item, Image.Image) else Image.open(item["path"] if isinstance(item, dict) else item)
        images.append(square_image(im, cfg.image_size, cfg.channels))
    out: dict[str, Any] = {"image": to_unit_range(torch.stack(images))}
    if cfg.label_column:
        out["label"] = torch.tensor(ds[cfg.label_column], dtype=torch.long)
    if cfg.caption_column:
        out["caption"] = [str(c) for c in ds[cfg.caption_column]]
    return out


def _class_names(cfg: HFDatasetConfig, ds: Any, labels: torch.Tensor) -> tuple[str, ...]:
    feature = ds.features.get(cfg.label_column) if cfg.label_column else None
    names = getattr(feature, "names", None)
    return tuple(names) if names else tuple(str(i) for i in range(int(labels.max()) + 1))


@dataset("hf-dataset", config=HFDatasetConfig)
def make_hf_dataset(cfg: HFDatasetConfig, split: str) -> TensorImageDataset:
    """A Hugging Face dataset by Hub id or local path: images resized and centre-cropped, labels or captions, cached."""
    if split not in ("train", "test"):
        raise DataError(f"hf-dataset has the splits train and test, not '{split}'")
    source = cfg.train_split if split == "train" or cfg.test_split is None else cfg.test_split
    ds = _load(cfg, source)
    key = fingerprint_of("hf-dataset", cfg.model_dump(), source, getattr(ds, "_fingerprint", None))
    cache = cache_dir() / "hf-datasets" / key
    if (cache / "tensors.safetensors").exists():
        tensors: dict[str, Any] = load_file(str(cache / "tensors.safetensors"))
        extra = json.loads((cache / "extra.json").read_text())
        if "caption" in extra:
            tensors["caption"] = extra["caption"]
        class_names = tuple(extra["class_names"])
    else:
        tensors = _tensors(cfg, ds)
        class_names = _class_names(cfg, ds, tensors["label"]) if "label" in tensors else ()
        os.makedirs(cache, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in tensors.items() if isinstance(v, torch.Tensor)},
            str(cache / "tensors.safetensors"),
        )
        write_atomic(
            cache / "extra.json",
            json.dumps(
                {"class_names": list(class_names), **({"caption": tensors["caption"]} if "caption" in tensors else {})}
            ).encode(),
        )
    if cfg.test_split is None:  # a fixed seeded choice of num_test items is the test split
        n = len(tensors["image"])
        if cfg.num_test >= n:
            raise DataError(f"hf-dataset: field 'num_test' is {cfg.num_test} but the train split has {n} items")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
        keep = order[: cfg.num_test] if split == "test" else order[cfg.num_test :]
        tensors = {
            k: (v[keep] if isinstance(v, torch.Tensor) else [v[i] for i in keep.tolist()]) for k, v in tensors.items()
        }
    spec = DataSpec(
        name="hf-dataset",
        image_shape=tuple(tensors["image"].shape[1:]),
        num_classes=len(class_names) or None,
        has_captions="caption" in tensors,
        class_names=class_names,
    )
    return TensorImageDataset(spec, tensors, fingerprint_of(key, split, cfg.num_test))
