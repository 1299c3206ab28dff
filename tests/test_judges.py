"""Judges: accuracy floors at cheap settings, bitwise determinism, the safetensors cache, the API."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import genzoo.eval.judges as judges
from genzoo.eval.judges import Judge, cache_dir, evaluate_judge, judge_key, load_judge, train_judge
from genzoo.plugins import default_registry

# Cheap settings (the defaults take ~50 s for shapes 32x32, ~12 s for digits; see DEFAULT_TRAIN).
SHAPES_SMALL = {"image_size": 16, "num_train": 3000, "num_test": 1000}
TINY = {"image_size": 16, "num_train": 256, "num_test": 64}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GENZOO_CACHE", str(tmp_path))
    return tmp_path


def test_shapes_judge_reaches_floor():
    # shapes 16x16, 3,000 training images, 300 steps (~10 s): measured 0.99 shape, 1.0 the rest
    judge = train_judge("shapes", SHAPES_SMALL, steps=300)
    for split in ("test", "heldout"):
        assert set(judge.accuracy[split]) == {"shape", "colour", "size", "position", "label"}
        for name, acc in judge.accuracy[split].items():
            assert acc >= 0.97, (split, name, acc)


def test_digits_judge_reaches_floor():
    # digits 8x8, 200 steps (~5 s): measured 0.993
    judge = train_judge("digits", steps=200)
    assert set(judge.accuracy) == {"test"}  # digits has no heldout split
    assert judge.accuracy["test"]["label"] >= 0.95
    test = default_registry().build("dataset", "digits").split("test")
    assert evaluate_judge(judge, test) == judge.accuracy["test"]


def test_training_is_deterministic_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a = train_judge("shapes", TINY, steps=5).state_dict()
    assert torch.equal(torch.random.get_rng_state(), state)
    b = train_judge("shapes", TINY, steps=5).state_dict()
    c = train_judge("shapes", TINY, steps=5, seed=1).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_cache_trains_once_then_loads(cache, monkeypatch, capsys):
    first = load_judge("digits", steps=20)
    assert "trained judge digits" in capsys.readouterr().err
    files = sorted(p.name for p in (cache / "judges").iterdir())
    assert files == [f"{first.key}.json", f"{first.key}.safetensors"]  # no temporary files left behind
    with safe_open(str(cache / "judges" / f"{first.key}.safetensors"), "pt") as f:  # a real safetensors file
        assert "heads.label.weight" in f.keys()
    meta = json.loads((cache / "judges" / f"{first.key}.json").read_text())
    assert meta["key"] == first.key and meta["accuracy"] == first.accuracy and meta["train"]["steps"] == 20

    def refuse(*args, **kwargs):
        raise AssertionError("load_judge retrained a cached judge")

    monkeypatch.setattr(judges, "train_judge", refuse)
    second = load_judge("digits", steps=20)
    assert capsys.readouterr().err == ""
    assert second.key == first.key and second.accuracy == first.accuracy
    x = torch.rand(40, 1, 8, 8) * 2 - 1
    assert torch.equal(first.features(x), second.features(x))
    with pytest.raises(FileNotFoundError):
        load_judge("digits", {"split_seed": 1}, steps=20, train_if_missing=False)


def test_key_tracks_what_affects_the_weights(cache):
    base = judge_key("digits")
    assert judge_key("digits", {"image_size": 8}) == base  # defaults spelled out: same judge
    assert judge_key("digits", {"split_seed": 1}) != base
    assert judge_key("digits", steps=10) != base
    assert judge_key("digits", seed=1) != base
    assert judge_key("shapes", {"image_size": 16}) != judge_key("shapes", {"image_size": 32})
    # shapes judges always train on every colour x shape pair, so the generator's heldout flag is moot
    assert judge_key("shapes", {"heldout": True}) == judge_key("shapes", {"heldout": False})


def test_cheap_fingerprint_matches_the_dataset():
    for name, cfg in (("digits", {}), ("shapes", TINY)):
        full = {**cfg, **judges.JUDGE_DATA.get(name, {})}
        source = default_registry().build("dataset", {"type": name, **full})
        assert judges._train_fingerprint(name, cfg) == source.split("train").fingerprint()


def test_features_and_predict_api():
    judge = Judge((3, 16, 16), {"shape": 4, "colour": 6, "size": 2, "position": 9}, label_from=("shape", "colour"))
    x = torch.rand(600, 3, 16, 16) * 2 - 1  # more than one 512-image chunk
    f = judge.features(x)
    assert f.shape == (600, judge.feature_dim) and judge.feature_dim == 128
    f += 1  # an ordinary tensor, not an inference-mode one
    assert judge.training  # features/predict restore the mode they found
    judge.eval()
    with torch.no_grad():
        assert torch.allclose(judge.features(x)[:3], judge._features(x[:3]), atol=1e-5)
    p = judge.predict(x)
    assert set(p) == {"shape", "colour", "size", "position", "label"}
    assert all(v.shape == (600,) and v.dtype == torch.long for v in p.values())
    assert torch.equal(p["label"], p["shape"] * 6 + p["colour"])
    with pytest.raises(ValueError, match="expects images"):
        judge.features(torch.zeros(2, 3, 32, 32))
    for side, channels in ((8, 1), (32, 3), (64, 3)):  # every size the bundled datasets come in
        assert Judge((channels, side, side), {"label": 10}).features(torch.zeros(2, channels, side, side)).shape == (
            2,
            128,
        )


def test_cache_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("GENZOO_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "genzoo"
    monkeypatch.setenv("GENZOO_CACHE", str(tmp_path / "gz"))
    assert cache_dir() == tmp_path / "gz"
    monkeypatch.delenv("GENZOO_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir().parts[-2:] == (".cache", "genzoo")
