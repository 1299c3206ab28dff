"""Run directories read back: `genzoo runs`, recorded evaluations, and the model card `genzoo push` writes
(offline: the upload goes to a stub of huggingface_hub's HfApi)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genzoo import runs
from genzoo.checkpoint import resolve, save_checkpoint
from genzoo.cli import main
from genzoo.errors import GenzooError
from genzoo.hub import model_card, push
from genzoo.training.images import save_grid

RECIPE = {
    "name": "tiny-ddpm",
    "description": "A DDPM small enough for a test.",
    "pipeline": {"type": "diffusion", "condition": "none"},
    "data": {"type": "digits", "image_size": 8},
}


def make_run(root: Path, name: str, *, losses: list[float], fds: list[float]) -> Path:
    run = root / name
    w = {"decoder": {"w": torch.arange(6.0).reshape(2, 3)}}
    ckpt = save_checkpoint(run, step=len(losses), recipe=RECIPE, components=w, meta={"seed": 7, "wall_time": 90.0})
    (run / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": i + 1, "loss": v}) + "\n" for i, v in enumerate(losses))
    )
    save_grid(torch.zeros(4, 1, 8, 8), run / "samples" / f"step-{len(losses):08d}.png")
    for fd in fds:
        assert (
            runs.record_evaluation(
                ckpt,
                {
                    "step": len(losses),
                    "samples": 64,
                    "split": "test",
                    "swaps": {"sampler": "ddim"},
                    "figures": {"fd": fd, "precision": 0.5},
                },
            )
            == run / runs.EVALUATIONS
        )
    return run


def test_runs_table_reads_the_log_the_evaluations_and_the_checkpoint(tmp_path: Path, capsys) -> None:
    a = make_run(tmp_path, "a", losses=[1.0, 0.5, 0.25], fds=[12.0, 9.5, 11.0])
    make_run(tmp_path / "nested", "b", losses=[2.0], fds=[])
    assert runs.find_runs(tmp_path) == [a, tmp_path / "nested" / "b"]
    row = runs.summary(a)
    assert row["recipe"] == "tiny-ddpm" and row["step"] == 3 and row["last_loss"] == 0.25 and row["best_fd"] == 9.5
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "recipe", "step", "last_loss", "best_fd", "size_mb"] and len(lines) == 3
    assert lines[1].split()[1:5] == ["tiny-ddpm", "3", "0.25", "9.5"] and lines[2].split()[4] == "-"
    assert main(["runs", str(tmp_path), "--json"]) == 0
    assert [r["best_fd"] for r in json.loads(capsys.readouterr().out)] == [9.5, None]


def test_runs_of_an_empty_directory_is_one_line_error(tmp_path: Path, capsys) -> None:
    assert main(["runs", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("genzoo runs: error: no run directory under")


def test_a_lone_checkpoint_records_nothing(tmp_path: Path) -> None:
    ckpt = save_checkpoint(tmp_path / "run", step=1, recipe=RECIPE, components={"decoder": {"w": torch.ones(1)}})
    lone = tmp_path / "lone"
    ckpt.rename(lone)
    assert runs.run_dir_of(lone) is None and runs.record_evaluation(lone, {"figures": {}}) is None


def test_model_card_has_the_hub_header_the_run_facts_and_how_to_load(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", losses=[1.0, 0.5], fds=[12.0])
    card = model_card(run, "me/tiny", license="apache-2.0")
    head, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert "library_name: genzoo" in head and "license: apache-2.0" in head
    assert "- diffusion" in head and "pipeline_tag: unconditional-image-generation" in head
    assert "recipe `tiny-ddpm`" in body and "A DDPM small enough for a test." in body
    assert "steps: 2 (1.5 min of training), seed 7" in body
    assert "| 2 | 64 | test | sampler=ddim | fd | 12 |" in body
    assert "![samples](samples.png)" in body and "genzoo pull me/tiny model" in body
    assert "genzoo.load_model(huggingface_hub.snapshot_download('me/tiny'))" in body


class StubApi:
    """Records what push asks of huggingface_hub's HfApi."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []

    def create_repo(self, repo_id, **kw):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))

    def upload_folder(self, **kw):
        self.calls.append(("upload_folder", kw))

    def upload_file(self, **kw):
        self.calls.append(("upload_file", kw))


def test_push_uploads_the_checkpoint_the_card_and_the_grid(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", losses=[1.0], fds=[3.0])
    api = StubApi()
    assert push(run, "me/tiny", private=True, api=api) == "https://huggingface.co/me/tiny"
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "upload_folder", "upload_file", "upload_file"]
    assert api.calls[0][1] == {"repo_id": "me/tiny", "exist_ok": True, "private": True}
    folder = api.calls[1][1]
    assert Path(folder["folder_path"]) == resolve(run)
    assert "trainer.*" in folder["ignore_patterns"] and folder["repo_id"] == "me/tiny"
    card = api.calls[2][1]
    assert card["path_in_repo"] == "README.md" and card["path_or_fileobj"].decode() == model_card(run, "me/tiny")
    assert api.calls[3][1]["path_in_repo"] == "samples.png" and Path(api.calls[3][1]["path_or_fileobj"]).is_file()


def test_push_refuses_a_bad_repo_id_before_any_upload(tmp_path: Path) -> None:
    run = make_run(tmp_path, "a", losses=[1.0], fds=[])
    api = StubApi()
    with pytest.raises(GenzooError, match="not a valid Hub repo id"):
        push(run, "not a repo id", api=api)
    assert api.calls == []
