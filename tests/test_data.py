"""Datasets: determinism, splits, held-out pairs, captions, rendering, digits, imagefolder, tokenizer."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from genzoo.data import DataSpec
from genzoo.data.digits import DigitsConfig, make_digits
from genzoo.data.imagefolder import ImageFolderConfig, make_imagefolder
from genzoo.data.shapes import (
    COLOURS,
    PHRASINGS,
    POSITIONS,
    SHAPES,
    SIZES,
    ShapesConfig,
    caption,
    heldout_pairs,
    make_shapes,
    parse_caption,
    render,
)
from genzoo.data.tokenizer import BPETokenizer, BPETokenizerConfig
from genzoo.errors import DataError

SMALL = ShapesConfig(num_train=600, num_test=200)


def test_shapes_deterministic_by_seed() -> None:
    a, b = make_shapes(SMALL, "train").tensors(), make_shapes(SMALL, "train").tensors()
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    c = make_shapes(SMALL.model_copy(update={"seed": 1}), "train").tensors()
    assert not torch.equal(a["image"], c["image"])
    assert make_shapes(SMALL, "train").fingerprint() != make_shapes(SMALL, "test").fingerprint()


def test_shapes_splits_and_heldout_pairs() -> None:
    held = set(heldout_pairs())
    for split, n in (("train", 600), ("test", 200)):
        t = make_shapes(SMALL, split).tensors()
        assert len(t["image"]) == n and t["image"].shape[1:] == (3, 32, 32)
        assert t["image"].min() >= -1 and t["image"].max() <= 1
        pairs = {tuple(p) for p in t["attributes"][:, :2].tolist()}
        assert not pairs & held
        assert torch.equal(t["label"], t["attributes"][:, 0] * len(COLOURS) + t["attributes"][:, 1])
    h = make_shapes(SMALL, "heldout").tensors()
    assert {tuple(p) for p in h["attributes"][:, :2].tolist()} == held
    train = make_shapes(SMALL, "train").tensors()["attributes"]
    for j, values in enumerate((SHAPES, COLOURS, SIZES, POSITIONS)):
        assert set(train[:, j].tolist()) == set(range(len(values)))


def test_caption_round_trip_over_every_phrasing() -> None:
    for attrs in [(s, c, z, p) for s in range(4) for c in range(6) for z in range(2) for p in range(9)]:
        for phrasing in range(len(PHRASINGS)):
            for syn in (0, 1):
                got = parse_caption(caption(attrs, phrasing, syn))
                assert (got["shape"], got["colour"], got["size"], got["position"]) == attrs
    assert parse_caption("a purple blob") == {"shape": None, "colour": None, "size": None, "position": None}


def test_rendering_area_and_antialiasing() -> None:
    g = torch.Generator().manual_seed(0)
    # a large white-ish square in the centre: mean coverage = its area fraction
    x = render(torch.tensor([[1, 0, 1, 4]]), 64, g)  # red channel carries the shape
    red = (x[0, 0] + 1) / 2
    side = 2 * 0.85 * 0.19  # half-side 0.85 r, r ~ 0.19 (+-8% jitter)
    assert red.sum().item() / 64**2 / red.max().item() == pytest.approx(side**2, rel=0.2)
    inner = ((red > 0.02) & (red < red.max() - 0.02)).sum().item()
    assert inner > 0  # anti-aliased edges have intermediate values


def test_shapes_generation_speed() -> None:
    t0 = time.perf_counter()
    make_shapes(ShapesConfig(num_train=10_000), "train")
    assert time.perf_counter() - t0 < 30


def test_shapes_config_errors() -> None:
    with pytest.raises(ValidationError, match="image_size"):
        ShapesConfig(image_size=20)
    with pytest.raises(ValueError, match="shapes has splits .* not 'val'"):
        make_shapes(SMALL, "val")


def test_digits() -> None:
    tr, te = make_digits(DigitsConfig(), "train"), make_digits(DigitsConfig(), "test")
    assert len(tr) + len(te) == 1797 and len(te) == 297
    x = tr.tensors()["image"]
    assert x.shape[1:] == (1, 8, 8) and x.min() == -1 and x.max() == 1
    assert set(tr.tensors()["label"].tolist()) == set(range(10))
    assert tr.tensors()["caption"][0] == f"a handwritten digit {int(tr.tensors()['label'][0])}"
    assert make_digits(DigitsConfig(image_size=16), "train").spec.image_shape == (1, 16, 16)


def test_dataspec_json_round_trip() -> None:
    spec = make_shapes(SMALL, "train").spec
    assert DataSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match=r"DataSpec has no field\(s\) \['colour'\]"):
        DataSpec.from_dict({**spec.to_dict(), "colour": 1})


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for cls, colour in (("cats", (255, 0, 0)), ("dogs", (0, 0, 255))):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (40, 30), colour).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "caps.jsonl").write_text(
        "\n".join(
            json.dumps({"file": f"{c}/{i}.png", "caption": f"a {c[:-1]} {i}"})
            for c in ("cats", "dogs")
            for i in range(3)
        )
    )
    ds = make_imagefolder(ImageFolderConfig(root=str(tmp_path), image_size=16, captions="caps.jsonl"), "train")
    t = ds.tensors()
    assert t["image"].shape == (6, 3, 16, 16) and ds.spec.class_names == ("cats", "dogs")
    assert t["label"].tolist() == [0, 0, 0, 1, 1, 1] and t["caption"][3] == "a dog 0"
    assert t["image"][0, 0].mean().item() == pytest.approx(1.0) and t["image"][0, 2].mean().item() == pytest.approx(
        -1.0
    )
    (tmp_path / "caps.csv").write_text(
        "file,caption\n" + "\n".join(f"{c}/{i}.png,{c} {i}" for c in ("cats", "dogs") for i in range(3))
    )
    assert (
        make_imagefolder(ImageFolderConfig(root=str(tmp_path), image_size=8, captions="caps.csv"), "train").tensors()[
            "caption"
        ][0]
        == "cats 0"
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images .* under .*empty"):
        make_imagefolder(ImageFolderConfig(root=str(tmp_path / "empty")), "train")
    with pytest.raises(DataError, match="field 'root' is .*nowhere, which is not a directory"):
        make_imagefolder(ImageFolderConfig(root=str(tmp_path / "nowhere")), "train")
    with pytest.raises(DataError, match="captions file .*nothere.jsonl does not exist; fix field 'captions'"):
        make_imagefolder(ImageFolderConfig(root=str(tmp_path), captions="nothere.jsonl"), "train")


def test_imagefolder_names_an_unreadable_image_or_skips_it_when_asked(tmp_path: Path, capsys) -> None:
    from PIL import Image

    for i in range(4):
        Image.new("RGB", (12, 12), (0, 255, 0)).save(tmp_path / f"{i}.png")
    whole = (tmp_path / "0.png").read_bytes()
    (tmp_path / "1.png").write_bytes(whole[: len(whole) // 2])  # truncated
    (tmp_path / "2.png").write_bytes(b"not an image")  # corrupt
    with pytest.raises(DataError, match=r"imagefolder: .*1\.png cannot be read as an image .*set data.skip_bad=true"):
        make_imagefolder(ImageFolderConfig(root=str(tmp_path), image_size=8), "train")
    ds = make_imagefolder(ImageFolderConfig(root=str(tmp_path), image_size=8, skip_bad=True), "train")
    assert len(ds) == 2 and ds.skipped == ["1.png", "2.png"]
    assert "imagefolder: warning: skipped 2 unreadable image(s) of the train split" in capsys.readouterr().err


def test_tokenizer_offline_round_trip() -> None:
    tok = BPETokenizer(BPETokenizerConfig(context_length=16))
    ids = tok.encode(["a large red circle in the top left", "hi"])
    assert ids.shape == (2, 16) and ids[0, 0] == tok.sot_id and tok.vocab_size == 49408
    assert tok.decode(ids) == ["a large red circle in the top left", "hi"]
    long = tok.encode(["word " * 40])
    assert long[0, -1] == tok.eot_id  # cut to the context, still terminated


def test_torchvision_without_files_says_how_to_get_them(tmp_path: Path) -> None:
    from genzoo.data.imagefolder import TorchvisionConfig, make_torchvision

    with pytest.raises(DataError, match=r"torchvision MNIST: not found under .*; set download: true"):
        make_torchvision(TorchvisionConfig(name="MNIST", root=str(tmp_path)), "train")
