"""Checkpoints: bitwise round trip, atomic replacement, and every refusal with its message."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from genzoo.checkpoint import (
    flatten_state,
    load_checkpoint,
    load_state_into,
    load_tensors,
    save_checkpoint,
    unflatten_state,
)
from genzoo.errors import CheckpointError

RECIPE = {"name": "toy", "pipeline": {"type": "toy"}}


def components(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {
        "decoder": {"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g).double()},
        "prior": {"codes": torch.randint(0, 9, (5,), generator=g), "flag": torch.tensor([True, False])},
    }


def test_round_trip_is_bitwise(tmp_path: Path) -> None:
    comps = components()
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3, betas=(0.9, 0.99))
    opt.param_groups[0]["params"][0].grad = torch.ones(3)
    opt.step()
    state = {"optim": opt.state_dict(), "rng": torch.get_rng_state(), "epoch": 3, "pos": None, "hist": {5: [1.5, 2.0]}}
    save_checkpoint(tmp_path, step=7, recipe=RECIPE, components=comps, meta={"seed": 1}, trainer_state=state)
    ck = load_checkpoint(tmp_path, with_trainer_state=True)
    assert ck.step == 7 and ck.meta["seed"] == 1 and ck.recipe == RECIPE
    for role, sd in comps.items():
        for k, v in sd.items():
            assert ck.components[role][k].dtype == v.dtype and torch.equal(ck.components[role][k], v)
    back = ck.trainer_state
    assert torch.equal(back["rng"], state["rng"]) and back["epoch"] == 3 and back["pos"] is None
    assert back["hist"] == {5: [1.5, 2.0]}  # int keys survive JSON
    assert back["optim"]["param_groups"][0]["betas"] == (0.9, 0.99)
    opt2 = torch.optim.AdamW([torch.nn.Parameter(torch.randn(3))], lr=1e-3)
    opt2.load_state_dict(back["optim"])
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])


def test_flatten_rejects_unstorable_objects() -> None:
    with pytest.raises(TypeError, match="cannot store object at state.x without pickle"):
        flatten_state({"x": object()})
    tree, tensors = flatten_state({"a": (1, [2.5, "s"]), "t": torch.arange(3)})
    assert unflatten_state(json.loads(json.dumps(tree)), tensors)["a"] == (1, [2.5, "s"])


def test_latest_points_to_newest_and_old_are_pruned(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step=step, recipe=RECIPE, components=components(step), keep=2)
    assert (tmp_path / "latest").read_text().strip() == "step-00000003"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    assert torch.equal(load_checkpoint(tmp_path).components["decoder"]["w"], components(3)["decoder"]["w"])


def test_interrupted_write_keeps_previous_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    save_checkpoint(tmp_path, step=1, recipe=RECIPE, components=components(1))
    import genzoo.checkpoint as ckmod

    def crash(*a, **k):
        raise KeyboardInterrupt  # as if the process died while renaming the new checkpoint in

    monkeypatch.setattr(ckmod.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=2, recipe=RECIPE, components=components(2))
    monkeypatch.undo()
    ck = load_checkpoint(tmp_path)
    assert ck.step == 1
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]  # no temp dir left


def test_resaving_a_step_never_leaves_latest_naming_a_removed_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import genzoo.checkpoint as ckmod

    save_checkpoint(tmp_path, step=1, recipe=RECIPE, components=components(1))

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ckmod.os, "replace", crash)  # dies while the re-save of step 1 moves in
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, step=1, recipe=RECIPE, components=components(2))
    monkeypatch.undo()
    assert torch.equal(load_checkpoint(tmp_path).components["decoder"]["w"], components(1)["decoder"]["w"])
    save_checkpoint(tmp_path, step=1, recipe=RECIPE, components=components(2))  # the re-save, uninterrupted
    assert torch.equal(load_checkpoint(tmp_path).components["decoder"]["w"], components(2)["decoder"]["w"])
    assert len(list((tmp_path / "checkpoints").iterdir())) == 1  # the replaced folder is gone


def _ckpt_dir(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path, step=1, recipe=RECIPE, components=components())


def test_truncated_file(tmp_path: Path) -> None:
    d = _ckpt_dir(tmp_path)
    f = d / "decoder.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=r"decoder.safetensors is truncated: \d+ bytes, meta.json recorded \d+"):
        load_checkpoint(tmp_path)


def test_tampered_file(tmp_path: Path) -> None:
    d = _ckpt_dir(tmp_path)
    f = d / "decoder.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the sha256 in meta.json"):
        load_checkpoint(tmp_path)


def test_missing_file_and_bad_meta(tmp_path: Path) -> None:
    d = _ckpt_dir(tmp_path)
    (d / "prior.safetensors").unlink()
    with pytest.raises(CheckpointError, match="prior.safetensors is missing; the checkpoint is incomplete"):
        load_checkpoint(tmp_path)
    (d / "meta.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="meta.json is not valid JSON"):
        load_checkpoint(d)


def test_pickle_is_refused_by_suffix_and_by_content(tmp_path: Path) -> None:
    evil = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load .*model.pt: it is a pickle-based file"):
        load_tensors(evil)
    disguised = tmp_path / "weights.safetensors"
    disguised.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(CheckpointError, match="its content is a pickle"):
        load_tensors(disguised)
    only_pickles = tmp_path / "run"
    only_pickles.mkdir()
    torch.save({}, only_pickles / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: it is a pickle-based file"):
        load_checkpoint(only_pickles)


def test_pickle_inside_checkpoint_dir_is_refused(tmp_path: Path) -> None:
    d = _ckpt_dir(tmp_path)
    torch.save({}, d / "extra.pkl")
    with pytest.raises(CheckpointError, match="extra.pkl: it is a pickle-based file"):
        load_checkpoint(tmp_path)


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist; pass a directory written by `genzoo train`"):
        load_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="holds no genzoo checkpoint"):
        load_checkpoint(tmp_path)


def test_resume_state_required_for_resume(tmp_path: Path) -> None:
    _ckpt_dir(tmp_path)
    with pytest.raises(CheckpointError, match="holds no trainer state"):
        load_checkpoint(tmp_path, with_trainer_state=True)


def test_mismatched_weights_name_component_and_shape(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 4)
    state = {"weight": torch.zeros(5, 3), "bias": torch.zeros(4)}
    with pytest.raises(
        CheckpointError,
        match=r"component 'decoder' .*weight has shape \(5, 3\) in the checkpoint but \(4, 3\) in the model",
    ):
        load_state_into(model, state, role="decoder", where=tmp_path)
    with pytest.raises(CheckpointError, match=r"missing \['bias'\]"):
        load_state_into(model, {"weight": torch.zeros(4, 3)}, role="decoder", where=tmp_path)
