"""What every dataset exposes: a :class:`DataSpec`, stacked tensors, a fingerprint.

Datasets here are small enough to live in memory; the trainer indexes ``tensors()`` directly, so
no DataLoader worker or collate function stands between the data and the step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel
from torch import Tensor
from torch.utils.data import Dataset

from genzoo.registry import component


@dataclass(frozen=True)
class DataSpec:
    """The shape of the data a model is built for; stored in every checkpoint's meta.json."""

    name: str
    image_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int | None = None
    has_captions: bool = False
    attributes: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> value names
    class_names: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataSpec:
        """Inverse of ``to_dict`` (JSON turns tuples into lists)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"DataSpec has no field(s) {sorted(unknown)}; known fields: {sorted(known)}")
        d = dict(d)
        d["image_shape"] = tuple(d["image_shape"])
        d["attributes"] = {k: tuple(v) for k, v in d.get("attributes", {}).items()}
        d["class_names"] = tuple(d.get("class_names", ()))
        return cls(**d)


def fingerprint_of(*parts: Any) -> str:
    """A stable short hash of JSON-serialisable parts (config, split, generator version)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class TensorImageDataset(Dataset):
    """A map-style dataset over stacked tensors: ``image`` (N, C, H, W) in [-1, 1], ``label``, ``caption``..."""

    def __init__(self, spec: DataSpec, tensors: dict[str, Any], fingerprint: str) -> None:
        n = len(tensors["image"])
        for k, v in tensors.items():
            if len(v) != n:
                raise ValueError(f"dataset '{spec.name}': '{k}' has {len(v)} items but 'image' has {n}")
        self.spec = spec
        self._tensors = tensors
        self._fingerprint = fingerprint

    def __len__(self) -> int:
        return len(self._tensors["image"])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {k: v[i] for k, v in self._tensors.items()}

    def tensors(self) -> dict[str, Any]:
        """Every item stacked: tensors indexed on dim 0, captions as a list of str."""
        return self._tensors

    def fingerprint(self) -> str:
        return self._fingerprint


def to_unit_range(x: Tensor) -> Tensor:
    """[0, 1] -> [-1, 1], the range every model in genzoo consumes."""
    return (x * 2 - 1).clamp(-1, 1)


def resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-1] == size:
        return images
    return torch.nn.functional.interpolate(
        images, size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )


class DataSource:
    """A dataset config bound to its ``make(cfg, split)``: ``.spec`` and ``.split(name)``, each split built once."""

    def __init__(self, cfg: BaseModel, make: Callable[[BaseModel, str], Any]) -> None:
        self.cfg = cfg
        self._make = make
        self._splits: dict[str, Any] = {}

    def split(self, name: str) -> Any:
        if name not in self._splits:
            self._splits[name] = self._make(self.cfg, name)
        return self._splits[name]

    @property
    def spec(self) -> Any:
        return self.split("train").spec

    @property
    def version(self) -> Any:
        """The data module's ``VERSION`` when its data are procedural or bundled (fingerprint without rendering)."""
        return getattr(importlib.import_module(self._make.__module__), "VERSION", None)


def dataset(name: str, *, config: type[BaseModel]) -> Callable[[Callable[[BaseModel, str], Any]], Any]:
    """Mark ``make(cfg, split)`` as the dataset ``name`` (built through :func:`data_source`); a plugin registers it with
    its module (:meth:`genzoo.registry.PluginRegistrar.register_module`)."""
    return lambda make: component("dataset", name, config=config, factory=data_source(make))(make)


def data_source(make: Callable[[BaseModel, str], Any]) -> Callable[[BaseModel], DataSource]:
    """The registry factory of a dataset from its ``make(cfg, split)``; its summary is ``make``'s docstring."""

    def factory(cfg: BaseModel) -> DataSource:
        return DataSource(cfg, make)

    factory.__doc__ = make.__doc__
    return factory
