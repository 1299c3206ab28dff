"""Push and pull checkpoint directories through huggingface_hub.

``pull`` accepts a Hub repo id or a local directory (a checkpoint copied by hand, or a mirror);
with ``HF_HUB_OFFLINE=1`` it serves from the local Hub cache. Every pulled checkpoint is
verified (hashes, safetensors only) before it is reported as pulled.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from genzoo.checkpoint import load_checkpoint, resolve
from genzoo.errors import CheckpointError, GenzooError, OfflineError

ALLOW = ["*.json", "*.safetensors", "latest", "README.md"]


def _offline_error(what: str, repo_id: str, e: Exception) -> OfflineError:
    if what == "pull":
        hint = "check the network and `huggingface-cli login`, or pass a local directory instead of a repo id"
    elif "Offline" in type(e).__name__:
        hint = "HF_HUB_OFFLINE is set: unset it to push"
    else:  # a local directory is no answer to a failed upload
        hint = "check the network, and that `huggingface-cli login` holds a token that may write to it"
    return OfflineError(
        f"could not reach the Hugging Face Hub to {what} '{repo_id}' ({type(e).__name__}: "
        f"{(str(e).splitlines() or [''])[0][:100]}); {hint}"
    )


def _check_repo_id(repo_id: str, *, local_too: bool) -> None:
    """A malformed id is the user's typo, not an unreachable Hub: say so before any network call."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        also = "neither an existing local directory nor" if local_too else "not"
        raise GenzooError(
            f"'{repo_id}' is {also} a valid Hub repo id (OWNER/NAME of letters, digits, '-', '_' and '.'); fix the id"
        ) from None


def _copy_verified(src: Path, dest: Path) -> Path:
    """Copy the checkpoint files of a verified ``src`` (no trainer state) into ``dest``; a failure leaves nothing."""
    made = not dest.exists()
    dest.mkdir(parents=True, exist_ok=True)
    copied: list[Path] = []
    try:
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("trainer."):
                shutil.copy2(f, dest / f.name)
                copied.append(dest / f.name)
        load_checkpoint(dest)
    except BaseException:
        for f in copied:
            f.unlink(missing_ok=True)
        if made:
            shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


PIPELINE_TAGS = {"caption": "text-to-image", "image": "image-to-image"}  # else unconditional-image-generation


def model_card(path: str | Path, repo_id: str, *, license: str = "mit") -> str:
    """The repo's README.md: the Hub's metadata header (library_name, tags, pipeline_tag, license), then the recipe,
    data, training steps and time, the run's recorded evaluations, a sample grid and how to load it with genzoo."""
    from genzoo import runs

    ckpt = load_checkpoint(resolve(path))
    recipe, meta, run = ckpt.recipe, ckpt.meta, runs.run_dir_of(path)
    family = (recipe.get("pipeline") or {}).get("type", "?")
    condition = (recipe.get("pipeline") or {}).get("condition", "none")
    if family == "dalle2":
        condition = "caption"
    data = recipe.get("data") or {}
    tags = ["genzoo", family, *(["diffusion"] if family in ("diffusion", "dalle2", "latent-diffusion") else [])]
    header = [
        "---",
        "library_name: genzoo",
        f"license: {license}",
        "tags:",
        *[f"- {t}" for t in tags],
        f"pipeline_tag: {PIPELINE_TAGS.get(condition, 'unconditional-image-generation')}",
        "---",
        "",
    ]
    minutes = float(meta.get("wall_time") or 0) / 60
    lines = [f"# {repo_id.split('/')[-1]}", "", f"A genzoo `{family}` model: recipe `{recipe.get('name', '?')}`.", ""]
    if recipe.get("description"):
        lines += [recipe["description"], ""]
    lines += [
        "## Training",
        "",
        f"- data: `{json.dumps(data)}`",
        f"- steps: {meta.get('step')} ({minutes:.1f} min of training), seed {meta.get('seed', '?')}",
        f"- genzoo {meta.get('genzoo_version', '?')}, torch {meta.get('torch_version', '?')}",
        "",
    ]
    recorded = runs.evaluations(run) if run else []
    if recorded:
        lines += [
            "## Evaluation",
            "",
            "| step | samples | split | swaps | metric | value |",
            "|---|---|---|---|---|---|",
        ]
        for e in recorded:
            swaps = ", ".join(f"{k}={v}" for k, v in (e.get("swaps") or {}).items()) or "-"
            for k, v in (e.get("figures") or {}).items():
                lines.append(f"| {e.get('step')} | {e.get('samples')} | {e.get('split')} | {swaps} | {k} | {v:.4g} |")
        lines.append("")
    if run and runs.latest_grid(run):
        lines += ["## Samples", "", "![samples](samples.png)", ""]
    lines += [
        "## Use",
        "",
        "```bash",
        "pip install genzoo",
        f"genzoo pull {repo_id} model",
        "genzoo sample model -n 16",
        "```",
        "",
        "```python",
        "import genzoo, huggingface_hub",
        f"model = genzoo.load_model(huggingface_hub.snapshot_download('{repo_id}'))",
        "images = model.sample(16)",
        "```",
        "",
    ]
    return "\n".join(header + lines)


def push(path: str | Path, repo_id: str, *, private: bool = False, license: str = "mit", api=None) -> str:
    """Upload the checkpoint at ``path`` (run dir or checkpoint dir) to ``repo_id`` with its model card and latest
    sample grid; returns its URL. ``api``: an ``HfApi`` (tests pass a stub)."""
    from genzoo import runs

    ckpt = resolve(path)
    load_checkpoint(ckpt)  # never publish a corrupt checkpoint
    _check_repo_id(repo_id, local_too=False)
    card = model_card(path, repo_id, license=license).encode()
    run = runs.run_dir_of(path)
    grid = runs.latest_grid(run) if run else None
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        api.upload_folder(
            folder_path=str(ckpt),
            repo_id=repo_id,
            allow_patterns=ALLOW,
            ignore_patterns=["trainer.*", "README.md"],
            commit_message=f"genzoo checkpoint {ckpt.name}",
        )
        api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id=repo_id, commit_message="model card")
        if grid is not None:
            api.upload_file(
                path_or_fileobj=str(grid), path_in_repo="samples.png", repo_id=repo_id, commit_message="sample grid"
            )
    except Exception as e:  # huggingface_hub raises many network error types
        raise _offline_error("push to", repo_id, e) from e
    return f"https://huggingface.co/{repo_id}"


def pull(
    repo_id: str, dest: str | Path | None = None, *, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """Fetch a checkpoint into ``dest`` (default: the Hub cache, ``HF_HUB_CACHE``), verified before anything is
    written to ``dest``: a refused checkpoint leaves nothing there."""
    local = Path(repo_id)
    if local.exists():
        src = resolve(local)
    else:
        _check_repo_id(repo_id, local_too=True)
        from huggingface_hub import snapshot_download

        try:
            # always through the cache: with HF_HUB_OFFLINE=1 only the cache can serve it
            out = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=ALLOW))
        except Exception as e:
            name = type(e).__name__
            if "Offline" in name or "LocalEntryNotFound" in name or "Connection" in name or "Timeout" in name:
                raise OfflineError(
                    f"'{repo_id}' is not in the local Hub cache and the Hub cannot be reached ({name}); "
                    "connect to the network (and unset HF_HUB_OFFLINE), or pass a local checkpoint directory"
                ) from e
            raise _offline_error("pull", repo_id, e) from e
        src = out
    try:  # verified where it was fetched (the Hub cache) or found, before anything is written to dest
        src = resolve(src)
        load_checkpoint(src)
    except CheckpointError as e:
        where = f"; nothing was written to {dest}" if dest is not None else ""
        raise CheckpointError(f"pulled '{repo_id}' but it is not a valid genzoo checkpoint: {e}{where}") from e
    return src if dest is None else _copy_verified(src, Path(dest))
