"""The `hf-dataset` component on a small dataset the test builds and saves with `save_to_disk` (no network)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

datasets = pytest.importorskip("datasets")

from genzoo.errors import DataError, OfflineError  # noqa: E402
from genzoo.plugins import default_registry  # noqa: E402


def pil(colour: tuple[int, int, int], size: tuple[int, int] = (12, 10)):
    from PIL import Image

    return Image.new("RGB", size, colour)


@pytest.fixture
def saved(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("GENZOO_CACHE", str(tmp_path / "cache"))
    features = datasets.Features(
        {"img": datasets.Image(), "y": datasets.ClassLabel(names=["red", "blue"]), "text": datasets.Value("string")}
    )
    colours = [(255, 0, 0), (0, 0, 255)]

    def split(n: int) -> datasets.Dataset:
        return datasets.Dataset.from_dict(
            {
                "img": [pil(colours[i % 2]) for i in range(n)],
                "y": [i % 2 for i in range(n)],
                "text": [f"a {['red', 'blue'][i % 2]} square" for i in range(n)],
            },
            features=features,
        )

    out = tmp_path / "toy"
    datasets.DatasetDict({"train": split(6), "test": split(4)}).save_to_disk(str(out))
    return out


def build(**fields):
    return default_registry().build("dataset", {"type": "hf-dataset", **fields})


def test_splits_images_labels_captions_and_class_names(saved: Path) -> None:
    source = build(path=str(saved), image_column="img", label_column="y", caption_column="text", image_size=8)
    train, test = source.split("train").tensors(), source.split("test").tensors()
    assert train["image"].shape == (6, 3, 8, 8) and test["image"].shape == (4, 3, 8, 8)
    # red is (1, -1, -1) in [-1, 1], blue (-1, -1, 1): resized and cropped without bleeding
    torch.testing.assert_close(train["image"][0, :, 4, 4], torch.tensor([1.0, -1.0, -1.0]))
    torch.testing.assert_close(train["image"][1, :, 4, 4], torch.tensor([-1.0, -1.0, 1.0]))
    assert train["label"].tolist() == [0, 1, 0, 1, 0, 1] and train["caption"][1] == "a blue square"
    spec = source.spec
    assert spec.class_names == ("red", "blue") and spec.num_classes == 2 and spec.has_captions


def test_cache_serves_a_second_build_without_decoding(saved: Path, monkeypatch) -> None:
    first = build(path=str(saved), image_column="img", label_column="y", image_size=8).split("train").tensors()
    import genzoo_hf_datasets.hf as hf

    monkeypatch.setattr(hf, "_tensors", lambda *a: pytest.fail("decoded again instead of read from the cache"))
    again = build(path=str(saved), image_column="img", label_column="y", image_size=8).split("train").tensors()
    assert torch.equal(first["image"], again["image"]) and torch.equal(first["label"], again["label"])


def test_test_split_carved_from_train(saved: Path) -> None:
    source = build(path=str(saved), image_column="img", test_split=None, num_test=2, image_size=8)
    assert len(source.split("test")) == 2 and len(source.split("train")) == 4


def test_errors_name_the_field(saved: Path) -> None:
    with pytest.raises(DataError, match="has no column 'picture'"):
        build(path=str(saved), image_column="picture").split("train")
    with pytest.raises(DataError, match="not 'validation'.*'train_split' or 'test_split'"):
        build(path=str(saved), image_column="img", test_split="validation").split("test")


def test_a_hub_id_offline_fails_with_one_line(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(OfflineError, match="not cached and the Hugging Face Hub cannot be reached") as e:
        build(path="someone/not-downloaded").split("train")
    assert "\n" not in str(e.value)


def test_a_model_trains_on_it(saved: Path) -> None:
    from genzoo import api
    from genzoo.recipes import parse_recipe, resolve
    from genzoo.training import TrainConfig, Trainer

    body = {
        "description": "a tiny class-conditional DDPM",
        "pipeline": {"type": "diffusion", "condition": "class"},
        "data": {"type": "hf-dataset", "path": str(saved), "image_column": "img", "label_column": "y", "image_size": 8},
        "components": {
            "prior": {"type": "gaussian"},
            "decoder": {
                "type": "diffusion-decoder",
                "timesteps": 100,
                "denoiser": {
                    "type": "unet",
                    "model_channels": 8,
                    "channel_mult": [1],
                    "num_res_blocks": 1,
                    "attention_resolutions": [],
                    "num_classes": 2,
                },
            },
            "sampler": {"type": "ddim", "steps": 4},
        },
    }
    registry = default_registry()
    resolved = resolve("toy", parse_recipe("toy", body), registry)
    source = api.build_data(resolved)
    model = api.create_model(resolved, data_spec=source.spec)
    cfg = TrainConfig(steps=2, batch_size=2, sample_every=0, checkpoint_every=2, ema_decay=None)
    result = Trainer(
        model,
        source.split("train").tensors(),
        config=cfg,
        run_dir=saved.parent / "run",
        recipe=resolved,
        progress=False,
    ).fit()
    assert result.step == 2 and torch.isfinite(torch.tensor(result.losses["loss"]))
    x = model.eval().sample(2, {"y": torch.tensor([0, 1])}, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 3, 8, 8)
