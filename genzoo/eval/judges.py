"""Judges: small CNNs that genzoo trains itself, deterministically, to evaluate generated images.

A judge is trained on a dataset's ``train`` split to predict what is known about each image: the
four attributes of ``shapes`` (shape, colour, size, position), or the class ``label`` of a dataset
without attributes (``digits``). Two things come out of it:

* ``features(x)``: the globally pooled penultimate activations, the feature space in which
  ``genzoo.eval.metrics`` measures FD, KID and precision/recall (the role Inception-v3 plays for
  FID on natural images, but trained on the very data the generators model, and in seconds);
* ``predict(x)``: per-attribute predictions, for attribute accuracy of conditional samples and
  class coverage.

No weights are downloaded: ``load_judge`` trains a judge the first time it is asked for (about a
minute on two CPU cores for shapes 32x32) and caches it under ``cache_dir()/judges`` as
``<key>.safetensors`` + ``<key>.json``. The key hashes everything that affects the weights, so a
changed dataset config, architecture or training setting gets a new judge, never a stale one.
Training is seeded throughout and runs on the CPU by default, so the same key gives bitwise the
same weights on any machine with the same torch build and thread count.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save as st_save
from torch import Tensor, nn

from genzoo.checkpoint import dumps_json, load_tensors, read_json, write_atomic
from genzoo.data import DataSource, TensorImageDataset
from genzoo.data.base import DataSpec, fingerprint_of

__all__ = [
    "JUDGE_VERSION",
    "Judge",
    "JudgeConfig",
    "JudgeTrainConfig",
    "cache_dir",
    "evaluate_judge",
    "judge_key",
    "load_judge",
    "train_judge",
]

# Bump when anything that shapes the weights changes outside the configs below (the training loop,
# augmentation, initialisation): every cached judge then retrains under a new key.
JUDGE_VERSION = 1
_CHUNK = 512  # images per forward pass in features/predict: bounded memory for any N


class JudgeConfig(BaseModel):
    """Architecture of a judge."""

    model_config = ConfigDict(extra="forbid")
    widths: list[int] = Field(
        [32, 64, 128], description="channels per stage; every stage after the first halves the side"
    )
    stem_side: int = Field(16, ge=4, description="stride-2 stem convolutions shrink the side to at most this first")
    coords: bool = Field(True, description="append (x, y) coordinate channels to the input")


class JudgeTrainConfig(BaseModel):
    """How a judge is trained (AdamW, linear warm-up, cosine decay to zero)."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(1000, ge=1, description="optimiser steps")
    batch_size: int = Field(128, ge=1, description="images per step")
    lr: float = Field(3e-3, gt=0, description="peak learning rate")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW decoupled weight decay")
    warmup: int = Field(50, ge=0, description="steps of linear learning-rate warm-up")
    translate: int = Field(0, ge=0, description="random shifts of up to this many pixels (0: none)")


# Per-dataset defaults. No shifts for shapes: position is an attribute, and its jitter is already
# in the data. Digits are real handwriting with only 1,500 training images: 1-pixel shifts help.
DEFAULT_TRAIN: dict[str, JudgeTrainConfig] = {
    "shapes": JudgeTrainConfig(steps=1000),
    "digits": JudgeTrainConfig(steps=800, translate=1),
}


# --------------------------------------------------------------------------- the network


class Judge(nn.Module):
    """A small CNN: conv3x3-BN-ReLU blocks, global average pooling, one linear head per attribute.

    ``forward(x) -> {head: logits}`` (for training); ``features(x) -> (N, D)`` and
    ``predict(x) -> {head: LongTensor}`` batch internally and run in eval mode without autograd.
    """

    def __init__(
        self,
        image_shape: tuple[int, int, int],
        heads: dict[str, int],
        cfg: JudgeConfig | None = None,
        label_from: tuple[str, str] | None = None,
    ) -> None:
        super().__init__()
        cfg = cfg or JudgeConfig()
        c, h, w = image_shape
        if h != w or h < 4:
            raise ValueError(f"a judge needs square images with side >= 4, got {image_shape}")
        self.image_shape = (c, h, w)
        self.cfg = cfg
        self.heads_spec = dict(heads)
        self.label_from = label_from  # label = a * n_b + b, e.g. shapes' shape * 6 + colour
        self.accuracy: dict[str, dict[str, float]] = {}  # split -> head -> accuracy, set when trained or loaded
        self.key: str | None = None

        # Global pooling forgets where things are, but position is an attribute: coordinate
        # channels (CoordConv, Liu et al. 2018) let the pooled features say where the object was.
        if cfg.coords:
            ramp = torch.linspace(-1, 1, h)
            self.register_buffer(
                "grid", torch.stack([ramp.view(h, 1).expand(h, w), ramp.view(1, w).expand(h, w)]), persistent=False
            )
        layers: list[nn.Module] = []
        ch, side = c + (2 if cfg.coords else 0), h
        # The stem spends stride-2 convolutions on large images, so 32x32 and 64x64 cost little more than 16x16.
        while side > cfg.stem_side:
            layers += _block(ch, cfg.widths[0], stride=2)
            ch, side = cfg.widths[0], (side + 1) // 2
        for i, width in enumerate(cfg.widths):
            layers += _block(ch, width, stride=1 if i == 0 else 2)
            ch = width
        self.body = nn.Sequential(*layers)
        self.feature_dim = ch
        self.heads = nn.ModuleDict({name: nn.Linear(ch, n) for name, n in heads.items()})

    def _features(self, x: Tensor) -> Tensor:
        # Generated samples may overshoot [-1, 1]; the data never does, so clamp as any sampler's output would be.
        x = x.clamp(-1, 1)
        if self.cfg.coords:
            x = torch.cat([x, self.grid.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.body(x).mean(dim=(2, 3))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self._features(x)
        return {name: head(f) for name, head in self.heads.items()}

    def _batched(self, x: Tensor, fn: Any) -> list[Tensor]:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
            raise ValueError(f"judge expects images (N, {', '.join(map(str, self.image_shape))}), got {tuple(x.shape)}")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.inference_mode():
                return [fn(x[i : i + _CHUNK].to(device, torch.float32)).to(x.device) for i in range(0, len(x), _CHUNK)]
        finally:
            self.train(was_training)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate features (N, D) of images (N, C, H, W) in [-1, 1], on ``x``'s device."""
        # torch.cat outside inference mode returns an ordinary tensor the caller may modify in place.
        return torch.cat(self._batched(x, self._features)) if len(x) else torch.zeros(0, self.feature_dim)

    def predict(self, x: Tensor) -> dict[str, Tensor]:
        """Predicted value index per head (plus the derived ``label`` where the dataset has one)."""
        names = list(self.heads_spec)
        preds = torch.cat(self._batched(x, lambda b: torch.stack([v.argmax(1) for v in self(b).values()], 1)))
        out = {name: preds[:, i] for i, name in enumerate(names)}
        if self.label_from is not None:
            a, b = self.label_from
            out["label"] = out[a] * self.heads_spec[b] + out[b]
        return out


def _block(cin: int, cout: int, stride: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


# --------------------------------------------------------------------------- data


def _heads_for(spec: DataSpec) -> dict[str, int]:
    """Attributes where the dataset has them, else its class label."""
    if spec.attributes:
        return {name: len(values) for name, values in spec.attributes.items()}
    if spec.num_classes:
        return {"label": spec.num_classes}
    raise ValueError(f"dataset '{spec.name}' has neither attributes nor class labels: a judge has nothing to learn")


def _targets(dataset: TensorImageDataset, heads: dict[str, int] | list[str]) -> dict[str, Tensor]:
    """Ground truth per head name (attribute columns, or ``label``)."""
    t, spec = dataset.tensors(), dataset.spec
    out = {}
    for name in heads:
        if name in spec.attributes and "attributes" in t:
            out[name] = t["attributes"][:, list(spec.attributes).index(name)]
        elif name == "label" and "label" in t:
            out[name] = t["label"]
    return out


def _label_rule(dataset: TensorImageDataset, heads: dict[str, int]) -> tuple[str, str] | None:
    """("shape", "colour") when the class label is shape * n_colours + colour on every training image."""
    targets = _targets(dataset, heads)
    label = dataset.tensors().get("label")
    if "label" in heads or label is None or not {"shape", "colour"} <= set(targets):
        return None
    ok = torch.equal(label, targets["shape"] * heads["colour"] + targets["colour"])
    return ("shape", "colour") if ok else None


# Data settings a judge always trains with, whatever the generator's. A shapes judge must recognise
# the colour x shape pairs held out from generators' training data: trained without them it learns
# that no triangle is red, and gets the shape of 59% of heldout images wrong.
JUDGE_DATA: dict[str, dict[str, Any]] = {"shapes": {"heldout": False}}


def _source(dataset_name: str, data_config: dict | None) -> DataSource:
    """The judge's dataset: the caller's config with ``JUDGE_DATA`` on top, from the plugins' registry."""
    from genzoo.plugins import default_registry

    registry = default_registry()
    if dataset_name not in registry.names("dataset"):
        raise ValueError(f"unknown dataset '{dataset_name}'; known: {registry.names('dataset')}")
    return registry.build("dataset", {"type": dataset_name, **(data_config or {}), **JUDGE_DATA.get(dataset_name, {})})


def _make(dataset_name: str, data_config: dict | None, split: str) -> TensorImageDataset:
    return _source(dataset_name, data_config).split(split)


def _eval_splits(dataset_name: str, data_config: dict | None) -> dict[str, TensorImageDataset]:
    """The dataset's non-train splits among test and heldout (digits has no heldout)."""
    out = {}
    for split in ("test", "heldout"):
        try:
            out[split] = _make(dataset_name, data_config, split)
        except ValueError as e:
            if "split" not in str(e):
                raise
    return out


def _shift(x: Tensor, max_shift: int, g: torch.Generator) -> Tensor:
    """Translate each image by up to ``max_shift`` pixels, filling with the background (-1)."""
    n, _, h, w = x.shape
    d = torch.randint(-max_shift, max_shift + 1, (2, n, 1), generator=g)
    rows = (torch.arange(h) + max_shift + d[0]).to(x.device)  # (n, h) rows of the padded image
    cols = (torch.arange(w) + max_shift + d[1]).to(x.device)
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    batch = torch.arange(n, device=x.device).view(n, 1, 1)
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# --------------------------------------------------------------------------- training, evaluation


def _train_config(dataset_name: str, train: JudgeTrainConfig | None, steps: int | None) -> JudgeTrainConfig:
    cfg = train or DEFAULT_TRAIN.get(dataset_name, JudgeTrainConfig())
    return cfg.model_copy(update={"steps": steps}) if steps is not None else cfg


def train_judge(
    dataset_name: str,
    data_config: dict | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    device: str | torch.device = "cpu",
    arch: JudgeConfig | None = None,
    train: JudgeTrainConfig | None = None,
) -> Judge:
    """Train a judge on the ``train`` split and measure its accuracy on ``test`` (and ``heldout``).

    Deterministic: weights come from ``seed`` and the batch order and shifts from a generator seeded
    with it; the global RNG is left as it was. ``steps`` overrides ``train.steps``.
    """
    t0 = time.perf_counter()
    arch = arch or JudgeConfig()
    tcfg = _train_config(dataset_name, train, steps)
    data = _make(dataset_name, data_config, "train")
    heads = _heads_for(data.spec)
    targets = torch.stack(list(_targets(data, heads).values()), 1).to(device)
    images = data.tensors()["image"].to(device, torch.float32)

    with torch.random.fork_rng(devices=[]):  # seeded initialisation without disturbing the caller's RNG
        torch.manual_seed(seed)
        judge = Judge(data.spec.image_shape, heads, arch, label_from=_label_rule(data, heads))
    judge.to(device).train()
    opt = torch.optim.AdamW(judge.parameters(), lr=tcfg.lr, weight_decay=tcfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(len(images), generator=g), 0
    for step in range(tcfg.steps):
        if pos + tcfg.batch_size > len(order):  # a fresh permutation each epoch; no image seen twice in one
            order, pos = torch.randperm(len(images), generator=g), 0
        idx = order[pos : pos + tcfg.batch_size].to(device)
        pos += tcfg.batch_size
        x, y = images[idx], targets[idx]
        if tcfg.translate:
            x = _shift(x, tcfg.translate, g)
        # linear warm-up, then cosine decay to zero: the last steps polish the last fraction of a percent
        warm = min(1.0, (step + 1) / tcfg.warmup) if tcfg.warmup else 1.0
        lr = tcfg.lr * warm * 0.5 * (1 + math.cos(math.pi * step / tcfg.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        logits = judge(x)
        loss = sum(F.cross_entropy(logits[name], y[:, i]) for i, name in enumerate(heads))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    judge.eval()
    judge.accuracy = {split: evaluate_judge(judge, ds) for split, ds in _eval_splits(dataset_name, data_config).items()}
    judge.train_seconds = time.perf_counter() - t0  # type: ignore[attr-defined]
    return judge


def evaluate_judge(judge: Judge, dataset: TensorImageDataset) -> dict[str, float]:
    """Accuracy per head on ``dataset`` (and of the derived ``label``, where the judge derives one)."""
    preds = judge.predict(dataset.tensors()["image"])
    truth = _targets(dataset, list(preds))
    return {name: (preds[name].cpu() == truth[name].cpu()).float().mean().item() for name in preds if name in truth}


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$GENZOO_CACHE``, else ``$XDG_CACHE_HOME/genzoo``, else ``~/.cache/genzoo``."""
    if os.environ.get("GENZOO_CACHE"):
        return Path(os.environ["GENZOO_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "genzoo"


def _train_fingerprint(dataset_name: str, data_config: dict | None) -> str:
    """The train split's fingerprint, without rendering it where the data module can tell.

    Bundled and procedural datasets (a module ``VERSION``) fingerprint as (name, VERSION, config,
    split): recomputing that skips seconds of rendering on every cached load. Others (image
    folders) depend on files on disk, so their train split is built and asked.
    """
    source = _source(dataset_name, data_config)
    if source.version is not None:
        return fingerprint_of(dataset_name, source.version, source.cfg.model_dump(), "train")
    return source.split("train").fingerprint()


def _key_parts(
    dataset_name: str, data_config: dict | None, seed: int, arch: JudgeConfig, tcfg: JudgeTrainConfig
) -> dict[str, Any]:
    return {
        "judge_version": JUDGE_VERSION,
        "dataset": dataset_name,
        "data_config": _source(dataset_name, data_config).cfg.model_dump(mode="json"),
        "train_fingerprint": _train_fingerprint(dataset_name, data_config),
        "arch": arch.model_dump(mode="json"),
        "train": tcfg.model_dump(mode="json"),
        "seed": seed,
    }


def judge_key(
    dataset_name: str,
    data_config: dict | None = None,
    *,
    steps: int | None = None,
    seed: int = 0,
    arch: JudgeConfig | None = None,
    train: JudgeTrainConfig | None = None,
) -> str:
    """16 hex digits of sha256 over everything that affects a judge's weights."""
    parts = _key_parts(
        dataset_name, data_config, seed, arch or JudgeConfig(), _train_config(dataset_name, train, steps)
    )
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def load_judge(
    dataset_name: str,
    data_config: dict | None = None,
    *,
    device: str | torch.device | None = None,
    train_if_missing: bool = True,
    steps: int | None = None,
    seed: int = 0,
    arch: JudgeConfig | None = None,
    train: JudgeTrainConfig | None = None,
) -> Judge:
    """The cached judge for this dataset and config, trained and cached first if missing.

    Training always runs on the CPU, so every machine computes metrics in the same feature space;
    the judge is then moved to ``device`` (default CPU).
    """
    arch = arch or JudgeConfig()
    tcfg = _train_config(dataset_name, train, steps)
    parts = _key_parts(dataset_name, data_config, seed, arch, tcfg)
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    weights, meta_path = cache_dir() / "judges" / f"{key}.safetensors", cache_dir() / "judges" / f"{key}.json"

    if weights.exists() and meta_path.exists():
        meta = read_json(meta_path)
        judge = Judge(
            tuple(meta["image_shape"]),
            meta["heads"],
            JudgeConfig(**meta["arch"]),
            label_from=tuple(meta["label_from"]) if meta["label_from"] else None,
        )
        judge.load_state_dict(load_tensors(weights))  # safetensors only: never unpickles
        judge.accuracy = meta["accuracy"]
    elif not train_if_missing:
        raise FileNotFoundError(
            f"no cached judge {weights} for {dataset_name} {data_config or {}} (train_if_missing=False)"
        )
    else:
        judge = train_judge(dataset_name, data_config, seed=seed, device="cpu", arch=arch, train=tcfg)
        seconds = judge.train_seconds  # type: ignore[attr-defined]
        meta = {
            **parts,
            "key": key,
            "image_shape": list(judge.image_shape),
            "heads": judge.heads_spec,
            "label_from": list(judge.label_from) if judge.label_from else None,
            "feature_dim": judge.feature_dim,
            "accuracy": judge.accuracy,
            "train_seconds": round(seconds, 1),
            "torch_version": torch.__version__,
        }
        # weights first: the .json is the marker that a complete judge exists
        write_atomic(weights, st_save({k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}))
        write_atomic(meta_path, dumps_json(meta))
        acc = "; ".join(
            f"{split} " + " ".join(f"{k} {v:.4f}" for k, v in a.items()) for split, a in judge.accuracy.items()
        )
        print(f"genzoo: trained judge {dataset_name} {key} in {seconds:.0f}s ({acc}) -> {weights}", file=sys.stderr)
    judge.key = key
    return judge.to(device or "cpu").eval()
