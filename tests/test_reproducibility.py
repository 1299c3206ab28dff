"""Issue 21.1: a run's seed decides everything it draws (init, data order, noise), whatever the process did before.

Every recipe builds bitwise the same initial weights twice (under different process RNG states); a few families
train twice to bitwise-equal checkpoints in process; one `genzoo train` runs twice through the command line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import threads

from genzoo import api
from genzoo.training import TrainConfig, Trainer

TINY_TRAIN = [
    "train.steps=2",
    "train.stages=null",
    "train.batch_size=4",
    "train.checkpoint_every=1000",
    "train.sample_every=0",
    "train.log_every=1",
]
# one or two of each family, trained in process; the fitted mixture priors take 3 EM iterations (100 cost seconds)
TRAINED = {
    "gan-digits": (),
    "ae-digits": ("prior.iterations=3",),
    "vae-digits": (),
    "vqvae-digits": (),
    "ddpm-digits": (),
    "iddpm-digits": (),
    "cfg-digits": (),
    "adm-digits": (),
    "cgan-shapes": (),
    "dae-shapes": ("prior.iterations=3",),
    "cvqvae-shapes": (),
}


def tiny(name: str, extra: tuple[str, ...] = ()) -> dict:
    """The recipe with two small steps and, on shapes, a small data set (the data do not change what is built)."""
    sets = list(TINY_TRAIN)
    if api.resolve_recipe(name)["data"]["type"] == "shapes":
        sets += ["data.num_train=64", "data.num_test=16"]
    return api.resolve_recipe(name, sets=[*sets, *extra])


_SOURCES: dict[str, object] = {}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: a second intra-op thread gains nothing and, on a busy machine, costs 30x in spinning."""
    with threads(1):
        yield


def source_of(resolved: dict):
    """One data source per data spec in this module (rendering shapes is the slow part)."""
    key = repr(resolved["data"])
    if key not in _SOURCES:
        _SOURCES[key] = api.build_data(resolved)
    return _SOURCES[key]


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


# a recipe whose encoder is a pretrained model fetched from the Hub (t5-small) cannot be built offline; its build
# and training are tested with a tiny local T5 in tests/test_t5_encoder.py
NEEDS_A_DOWNLOAD = {"glide-t5-shapes"}


@pytest.mark.parametrize("name", [n for n in api.list_recipes() if n not in NEEDS_A_DOWNLOAD])
def test_every_recipe_builds_the_same_initial_weights_whatever_the_process_rng(name: str) -> None:
    resolved = tiny(name)
    spec = source_of(resolved).spec
    torch.manual_seed(1234)
    first = weights(api.create_model(resolved, data_spec=spec))
    torch.randn(7)  # a process that drew something else before: the init must not follow it
    state = torch.get_rng_state()
    second = weights(api.create_model(resolved, data_spec=spec))
    assert torch.equal(state, torch.get_rng_state())  # the caller's stream is left alone
    assert_bitwise(first, second)
    params = [k for k, v in first.items() if v.is_floating_point() and v.numel() > 1]
    if params:  # the seed is what decides it
        other = weights(api.create_model(tiny(name, ("train.seed=1",)), data_spec=spec))
        assert any(not torch.equal(first[k], other[k]) for k in params)


def _train(name: str, run_dir: Path) -> dict[str, bytes]:
    resolved = tiny(name, TRAINED[name])
    source = source_of(resolved)
    torch.manual_seed(len(str(run_dir)))  # each run starts from a different process RNG state
    pipeline = api.create_model(resolved, data_spec=source.spec)
    result = Trainer(
        pipeline,
        source.split("train").tensors(),
        config=TrainConfig.model_validate(resolved["train"]),
        run_dir=run_dir,
        recipe=resolved,
        meta={},
        progress=False,
    ).fit()
    return {f.name: f.read_bytes() for f in sorted(Path(result.checkpoint).glob("*.safetensors"))}


@pytest.mark.parametrize("name", TRAINED)
def test_training_twice_gives_bitwise_equal_checkpoints(name: str, tmp_path: Path) -> None:
    a, b = _train(name, tmp_path / "a"), _train(name, tmp_path / "bb")
    assert a.keys() == b.keys() and "trainer.safetensors" in a
    assert [f for f in a if a[f] != b[f]] == []


def test_the_same_train_command_twice_writes_the_same_checkpoint(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENZOO_STRICT_PLUGINS": "1"}
    files = []
    for run in ("a", "b"):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "genzoo",
                "train",
                "vae-digits",
                "--steps",
                "3",
                "--seed",
                "0",
                "--out",
                str(tmp_path / run),
                "--no-progress",
                "--set",
                "train.batch_size=8",
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        ckpt = tmp_path / run / "checkpoints" / (tmp_path / run / "latest").read_text().strip()
        files.append({f.name: f.read_bytes() for f in sorted(ckpt.glob("*.safetensors"))})
    assert files[0].keys() == files[1].keys() and files[0] == files[1]
