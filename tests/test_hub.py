"""Pulling checkpoints without a network: from a local directory and from a pre-populated Hub cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from genzoo.checkpoint import load_checkpoint, save_checkpoint
from genzoo.errors import CheckpointError, OfflineError
from genzoo.hub import pull

RECIPE = {"name": "toy", "pipeline": {"type": "toy"}}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    w = {"decoder": {"w": torch.arange(6.0).reshape(2, 3)}}
    return save_checkpoint(tmp_path / "run", step=3, recipe=RECIPE, components=w, trainer_state={"x": torch.ones(2)})


def fake_hub_cache(cache: Path, repo_id: str, ckpt: Path, commit: str = "a" * 40) -> None:
    """The layout huggingface_hub writes: models--owner--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in ckpt.iterdir():
        shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)


def test_pull_from_local_directory_copies_weights_not_trainer_state(ckpt: Path, tmp_path: Path) -> None:
    out = pull(str(ckpt.parent.parent), tmp_path / "pulled")
    got = load_checkpoint(out)
    assert torch.equal(got.components["decoder"]["w"], torch.arange(6.0).reshape(2, 3))
    assert not any(p.name.startswith("trainer.") for p in out.iterdir())


def test_pull_refuses_a_tampered_copy(ckpt: Path, tmp_path: Path) -> None:
    src = tmp_path / "mirror"
    shutil.copytree(ckpt, src)
    data = bytearray((src / "decoder.safetensors").read_bytes())
    data[-1] ^= 1
    (src / "decoder.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a valid genzoo checkpoint: .*sha256"):
        pull(str(src))


def test_pull_from_prepopulated_cache_offline(ckpt: Path, tmp_path: Path) -> None:
    """Through the real CLI with HF_HUB_OFFLINE=1: served from the cache, verified, copied out."""
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "someone/genzoo-toy", ckpt)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)}
    r = subprocess.run(
        [sys.executable, "-m", "genzoo", "pull", "someone/genzoo-toy", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert torch.equal(load_checkpoint(tmp_path / "out").components["decoder"]["w"], torch.arange(6.0).reshape(2, 3))

    r = subprocess.run(
        [sys.executable, "-m", "genzoo", "pull", "someone/not-cached"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 2
    assert "not in the local Hub cache" in r.stderr and "pass a local checkpoint directory" in r.stderr


def test_pull_offline_in_process_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(OfflineError, match="not in the local Hub cache"):
        pull("someone/absent", cache_dir=tmp_path / "empty")
