"""Checkpoints: safetensors and JSON only, written atomically, verified when read.

A run directory looks like::

    run/
      latest                      name of the newest complete checkpoint (replaced atomically)
      checkpoints/step-00000200/
        meta.json                 genzoo version, step, seed, data fingerprint, files + sha256
        recipe.json               the resolved recipe the model was built from
        <role>.safetensors        one file per trained component (EMA weights when EMA is on)
        trainer.safetensors       resume state: raw weights, optimiser moments, RNG states
        trainer.json              resume state that is not a tensor

Each checkpoint is written into a temporary directory and renamed into place, then ``latest``
is replaced, so an interruption at any moment leaves the previous checkpoint intact. Loading
parses JSON and safetensors only: no pickle, no code from the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from genzoo import __version__
from genzoo.errors import CheckpointError

FORMAT = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle / torch zip


# --------------------------------------------------------------------------- atomic files


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def dumps_json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; is this a genzoo checkpoint directory?") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is truncated or corrupt"
        ) from None


def refuse_pickle(path: Path) -> None:
    """genzoo never unpickles: refuse by suffix and by content."""
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"refusing to load {path}: it is a pickle-based file and loading it could run arbitrary code; "
            "genzoo checkpoints hold safetensors only (convert the weights with safetensors.torch.save_file)"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if any(head.startswith(m) for m in _PICKLE_MAGIC):
        raise CheckpointError(
            f"refusing to load {path}: its content is a pickle (or a torch.save zip), which could run arbitrary code; "
            "genzoo loads safetensors only"
        )


def load_tensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a safetensors file (CPU tensors), refusing pickles and reporting corruption clearly."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    refuse_pickle(path)
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is not a valid safetensors file ({e}); it is truncated or corrupt") from None


# --------------------------------------------------------------------------- nested state


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, Tensor]]:
    """Split a nested state (optimiser, RNG, scheduler) into a JSON tree and a tensor dict.

    Tensors become ``{"__tensor__": key}``; dicts with non-string keys keep their key types.
    """
    tensors: dict[str, Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(x, Mapping):
            items = [[k, walk(v, f"{path}.{k}")] for k, v in x.items()]
            if all(isinstance(k, str) for k in x):
                return {"__dict__": items}
            if all(isinstance(k, int) for k in x):
                return {"__intdict__": items}
            raise TypeError(f"cannot store dict keys of types {sorted({type(k).__name__ for k in x})} at {path}")
        if isinstance(x, (list, tuple)):
            return {
                "__tuple__" if isinstance(x, tuple) else "__list__": [walk(v, f"{path}.{i}") for i, v in enumerate(x)]
            }
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store {type(x).__name__} at {path} without pickle")

    return walk(obj, prefix or "state"), tensors


def unflatten_state(tree: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(tree, dict):
        if "__tensor__" in tree:
            try:
                return tensors[tree["__tensor__"]]
            except KeyError:
                raise CheckpointError(
                    f"trainer state references tensor {tree['__tensor__']!r} that is not stored"
                ) from None
        if "__dict__" in tree or "__intdict__" in tree:
            return {k: unflatten_state(v, tensors) for k, v in tree.get("__dict__", tree.get("__intdict__"))}
        if "__tuple__" in tree:
            return tuple(unflatten_state(v, tensors) for v in tree["__tuple__"])
        if "__list__" in tree:
            return [unflatten_state(v, tensors) for v in tree["__list__"]]
    return tree


# --------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """A loaded, verified checkpoint."""

    path: Path
    meta: dict[str, Any]
    recipe: dict[str, Any]
    components: dict[str, dict[str, Tensor]]
    trainer_state: Any = None  # the nested resume state, if saved
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def unshared(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Copy tensors that share storage with an earlier one (tied weights: a GPT's wte and lm_head).

    safetensors refuses aliased tensors; on load ``load_state_dict`` writes both keys into the one
    tied parameter, so the tie survives the round trip.
    """
    seen, out = set(), {}
    for k, v in tensors.items():
        ptr = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if ptr is not None and ptr in seen else v
        seen.add(ptr)
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    run_dir: str | os.PathLike,
    *,
    step: int,
    recipe: Mapping[str, Any],
    components: Mapping[str, Mapping[str, Tensor]],
    meta: Mapping[str, Any] | None = None,
    trainer_state: Any = None,
    keep: int = 2,
) -> Path:
    """Write ``run_dir/checkpoints/step-N`` atomically, point ``latest`` at it, prune old ones."""
    run_dir = Path(run_dir)
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True, exist_ok=True)
    name = f"step-{step:08d}"
    files: dict[str, bytes] = {
        f"{role}.safetensors": st_save(unshared({k: v.detach().cpu().contiguous() for k, v in sd.items()}))
        for role, sd in components.items()
    }
    files["recipe.json"] = dumps_json(dict(recipe))
    if trainer_state is not None:
        tree, tensors = flatten_state(trainer_state)
        files["trainer.safetensors"] = st_save(unshared(tensors))
        files["trainer.json"] = dumps_json(tree)
    full_meta = {
        "format": FORMAT,
        "genzoo_version": __version__,
        "torch_version": torch.__version__,
        "step": step,
        "components": sorted(components),
        **dict(meta or {}),
        "files": {fname: {"sha256": _sha256(data), "bytes": len(data)} for fname, data in files.items()},
    }
    files["meta.json"] = dumps_json(full_meta)

    tmp = Path(tempfile.mkdtemp(dir=ckpts, prefix=f".{name}."))
    try:
        for fname, data in files.items():
            with open(tmp / fname, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        final = ckpts / name
        if final.exists():  # re-saving a step (SIGTERM right after a periodic save): a second folder, so that
            final = ckpts / f"{name}.{tmp.name.rsplit('.', 1)[1]}"  # `latest` never names a removed one
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_atomic(run_dir / "latest", (final.name + "\n").encode())
    for older in ckpts.iterdir():  # the folders this save replaced (none unless the step was saved before)
        if older != final and (older.name == name or older.name.startswith(name + ".")):
            shutil.rmtree(older, ignore_errors=True)
    if keep > 0:
        for old in sorted(p for p in ckpts.iterdir() if p.name.startswith("step-"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve(path: str | os.PathLike) -> Path:
    """A run directory (through ``latest``) or a checkpoint directory itself."""
    path = Path(path)
    if path.is_file():
        refuse_pickle(path)
        raise CheckpointError(f"{path} is a file; pass the run or checkpoint directory that holds meta.json")
    if (path / "meta.json").exists():
        return path
    latest = path / "latest"
    if latest.exists():
        target = path / "checkpoints" / latest.read_text().strip()
        if target.is_dir() and not (target / "meta.json").exists():  # the checkpoint is there but not its manifest
            raise CheckpointError(
                f"{target / 'meta.json'} is missing, so the checkpoint {target.name} cannot be "
                "verified or loaded; restore meta.json, or copy the checkpoint again"
            )
        if not (target / "meta.json").exists():
            raise CheckpointError(
                f"{latest} points at {target}, which is missing; the run directory was modified by hand"
            )
        return target
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a directory written by `genzoo train` or `genzoo pull`")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        refuse_pickle(path / pickles[0])
    if (path / "recipe.json").exists() or any(path.glob("*.safetensors")):
        raise CheckpointError(
            f"{path / 'meta.json'} is missing, so the checkpoint in {path} cannot be verified or "
            "loaded; restore meta.json, or copy the checkpoint again"
        )
    raise CheckpointError(
        f"{path} holds no genzoo checkpoint (no meta.json and no latest); train one with `genzoo train`"
    )


class FileRecord(BaseModel):
    """One entry of ``meta.json``'s ``files``: what the file must hash to and how long it is."""

    model_config = ConfigDict(extra="forbid")
    sha256: str = Field(..., pattern=r"^[0-9a-f]{64}$", description="hex sha256 of the file's bytes")
    bytes: StrictInt = Field(..., ge=0, description="the file's length")


class CheckpointMeta(BaseModel):
    """The fields of ``meta.json`` that loading reads; the rest (seed, stage, fingerprints, provenance) is free."""

    model_config = ConfigDict(extra="allow")
    format: StrictInt = Field(FORMAT, ge=0, description="checkpoint format version")
    step: StrictInt = Field(..., ge=0, description="the training step saved")
    components: list[str] = Field(default_factory=list, description="roles with a <role>.safetensors file")
    files: dict[str, FileRecord] = Field(..., description="file name -> sha256 and bytes")
    data_spec: dict[str, Any] | None = Field(None, description="the DataSpec the model was built for")

    @field_validator("data_spec")
    @classmethod
    def _data_spec_fits(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        from genzoo.data.base import DataSpec

        if v is not None:
            try:
                DataSpec.from_dict(v)
            except (ValueError, TypeError, KeyError) as e:
                raise ValueError(f"not a DataSpec: {e}") from None
        return v

    @model_validator(mode="after")
    def _listed(self) -> CheckpointMeta:
        needed = ["recipe.json", *(f"{role}.safetensors" for role in self.components)]
        unlisted = [f for f in needed if f not in self.files]
        if unlisted:
            raise ValueError(f"'files' has no entry for {unlisted[0]}, which a checkpoint of these components holds")
        return self


def _meta_error(path: Path, err: ValidationError) -> CheckpointError:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    got = repr(first.get("input"))
    got = (
        ""
        if first["type"] in ("missing", "extra_forbidden") or not loc or loc == "data_spec"
        else f" (got {got[:60] + '...' if len(got) > 60 else got})"
    )
    field = f"field '{loc}': " if loc else ""
    return CheckpointError(
        f"{path}: {field}{msg}{got}; the file was edited or not written by genzoo: restore it, "
        "or export the checkpoint again"
    )


def has_checkpoint(path: str | os.PathLike) -> bool:
    path = Path(path)
    return (path / "meta.json").exists() or (path / "latest").exists()


def load_checkpoint(path: str | os.PathLike, *, with_trainer_state: bool = False) -> Checkpoint:
    """Load and verify every file against the sizes and hashes recorded in ``meta.json``."""
    ckpt = resolve(path)
    meta = read_json(ckpt / "meta.json")
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{ckpt / 'meta.json'} holds a {type(meta).__name__}, not a mapping; it was not written by genzoo"
        )
    try:
        CheckpointMeta.model_validate(meta)
    except ValidationError as e:
        raise _meta_error(ckpt / "meta.json", e) from None
    if meta.get("format", 0) > FORMAT:
        raise CheckpointError(
            f"{ckpt} has checkpoint format {meta['format']}; this genzoo ({__version__}) reads format {FORMAT}: "
            "upgrade genzoo"
        )
    for fname in sorted(os.listdir(ckpt)):
        if Path(fname).suffix in PICKLE_SUFFIXES:
            refuse_pickle(ckpt / fname)
    blobs: dict[str, bytes] = {}
    for fname, info in meta["files"].items():
        if fname == "meta.json" or (not with_trainer_state and fname.startswith("trainer.")):
            continue
        f = ckpt / fname
        if not f.exists():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete")
        refuse_pickle(f)
        data = f.read_bytes()
        if len(data) < info["bytes"]:
            raise CheckpointError(
                f"{f} is truncated: {len(data)} bytes, meta.json recorded {info['bytes']}; "
                "copy or download the checkpoint again"
            )
        if len(data) > info["bytes"]:
            raise CheckpointError(
                f"{f} is longer than meta.json records ({len(data)} bytes, recorded "
                f"{info['bytes']}): it was appended to or replaced; copy or download it again"
            )
        if _sha256(data) != info["sha256"]:
            raise CheckpointError(f"{f} does not match the sha256 in meta.json: the file was modified or corrupted")
        blobs[fname] = data

    def tensors(fname: str) -> dict[str, Tensor]:
        try:
            return st_load(blobs[fname])
        except (SafetensorError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt / fname} is not a valid safetensors file ({e})") from None

    components = {role: tensors(f"{role}.safetensors") for role in meta.get("components", [])}
    recipe = json.loads(blobs["recipe.json"])
    state = None
    if with_trainer_state:
        if "trainer.json" not in blobs:
            raise CheckpointError(
                f"{ckpt} holds no trainer state (it was exported for sampling only); it cannot be resumed"
            )
        state = unflatten_state(json.loads(blobs["trainer.json"]), tensors("trainer.safetensors"))
    return Checkpoint(path=ckpt, meta=meta, recipe=recipe, components=components, trainer_state=state)


def load_state_into(module: torch.nn.Module, state: Mapping[str, Tensor], *, role: str, where: Path | str) -> None:
    """``load_state_dict`` with an error that says which component and what differs."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if shapes:
            k = shapes[0]
            parts.append(
                f"{k} has shape {tuple(state[k].shape)} in the checkpoint but {tuple(own[k].shape)} in the model"
            )
        raise CheckpointError(
            f"{where}: weights of component '{role}' do not match the model built from the recipe "
            f"({'; '.join(parts)}); "
            "the recipe was changed after training (drop the --set overrides that change the architecture)"
        )
    module.load_state_dict(state, strict=True)
