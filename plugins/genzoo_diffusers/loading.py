"""Reading diffusers folders and hub ids without unpickling anything: configs are JSON, weights safetensors only.

A hub id is fetched through ``huggingface_hub`` (the Hub cache; with ``HF_HUB_OFFLINE=1`` only the cache); a folder
that holds ``.bin`` pickles and no safetensors is refused with the one-line recipe to convert it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from genzoo.errors import CheckpointError, GenzooError, OfflineError

PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
FETCH = ["*.json", "*.safetensors", "*.txt"]  # configs, weights, tokenizer vocabularies: never a pickle


def convert_hint(folder: Path | str) -> str:
    return (
        f"load it with diffusers once where you trust it and save it again with "
        f"`.save_pretrained('{folder}-safetensors', safe_serialization=True)`, then pass that folder"
    )


def is_hub_id(source: str) -> bool:
    """``owner/name`` that is not an existing path."""
    parts = source.split("/")
    return not Path(source).exists() and len(parts) == 2 and all(parts) and not source.startswith((".", "~"))


def offline_error(source: str, e: BaseException) -> OfflineError:
    return OfflineError(
        f"'{source}' is not in the local Hugging Face cache and the Hub cannot be reached ({type(e).__name__}); "
        f"work offline with HF_HUB_OFFLINE=1 and a local folder (a pipeline saved with save_pretrained) or a cache "
        f"filled beforehand on a machine with a network (`huggingface-cli download {source}`)"
    )


def _network_failure(e: BaseException) -> bool:
    names = " ".join(type(c).__name__ for c in (e, e.__cause__, e.__context__) if c is not None)
    text = str(e).lower()
    return (
        any(k in names for k in ("Offline", "LocalEntryNotFound", "Connection", "Timeout"))
        or "connect" in text
        or "offline" in text
        or "cannot find the requested files" in text
    )


def fetch(source: str) -> Path:
    """A local folder for ``source`` (a folder, or a hub id fetched into the Hub cache: JSON and safetensors only)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise GenzooError(f"{source} is a file; pass the folder a diffusers pipeline or model was saved to")
        return path
    if not is_hub_id(source):
        raise GenzooError(f"{source} is neither a folder nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=FETCH))
    except Exception as e:  # huggingface_hub raises many error types for a missing network
        if _network_failure(e):
            raise offline_error(source, e) from e
        raise GenzooError(
            f"could not fetch '{source}' from the Hugging Face Hub: {type(e).__name__}: {e}".splitlines()[0]
        ) from e


def read_config(folder: Path, name: str = "config.json") -> dict[str, Any]:
    f = folder / name
    if not f.exists():
        raise GenzooError(f"{folder} has no {name}; pass a folder written by diffusers' save_pretrained")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise GenzooError(f"{f} is not valid JSON ({e.msg} at line {e.lineno})") from None


def require_safetensors(folder: Path) -> None:
    """Refuse a model folder whose weights exist only as pickles; genzoo never unpickles."""
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLES) if folder.is_dir() else []
    what = f"holds only pickled weights ({', '.join(pickles)})" if pickles else "holds no .safetensors weights"
    raise CheckpointError(f"{folder} {what}; genzoo reads safetensors only and never unpickles: {convert_hint(folder)}")


def from_pretrained(cls: Any, source: str, *, subfolder: str | None = None) -> Any:
    """``cls.from_pretrained`` on a folder or hub id with ``use_safetensors=True``; errors are one line."""
    folder = fetch(source)
    model_dir = folder / subfolder if subfolder else folder
    require_safetensors(model_dir)
    try:
        return cls.from_pretrained(str(folder), subfolder=subfolder, use_safetensors=True)
    except (OSError, ValueError) as e:
        raise GenzooError(f"diffusers could not load {cls.__name__} from {model_dir}: {e}".splitlines()[0]) from e
