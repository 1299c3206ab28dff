"""The example plugin under examples/, installed for real (a dist-info with its entry point on sys.path)."""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

import pytest
import torch

from genzoo.plugins import load_plugins
from genzoo.recipes import build_pipeline, load_recipes, resolve

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "genzoo-heun"


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """What `pip install examples/genzoo-heun` writes: the package and a dist-info with entry_points.txt."""
    site = tmp_path / "site"
    shutil.copytree(EXAMPLE / "genzoo_heun", site / "genzoo_heun")
    info = site / "genzoo_heun-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: genzoo-heun\nVersion: 0.1.0\n")
    entry = [line for line in (EXAMPLE / "pyproject.toml").read_text().splitlines() if line.startswith("heun =")]
    (info / "entry_points.txt").write_text("[genzoo]\n" + entry[0].replace('"', "") + "\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    yield
    sys.modules.pop("genzoo_heun", None)


def test_example_sampler_is_listed_and_works_in_a_recipe(installed) -> None:
    registry, infos = load_plugins(strict=True)
    info = {i.name: i for i in infos}["heun"]
    assert info.version == "0.1.0" and info.registered == [("sampler", "heun")]
    assert registry.get("sampler", "heun").plugin == "heun"
    recipe = load_recipes()["cfg-digits"]
    from genzoo.recipes import apply_overrides

    r = resolve(
        "cfg-digits",
        apply_overrides("cfg-digits", recipe, ["decoder.denoiser.model_channels=16"], sampler="heun", steps=4),
        registry,
    )
    spec = registry.build("dataset", "digits").split("test").spec
    model = build_pipeline(r, registry, spec).eval()
    x = model.sample(3, {"y": torch.tensor([1, 2, 3])}, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 8, 8) and x.abs().max() <= 1
    assert model.components["sampler"].nfe() == 7


def test_example_sampler_reproduces_the_mixture(installed) -> None:
    from genzoo_heun import HeunConfig, HeunSampler
    from test_samplers_closed_form import check_mixture, draw

    check_mixture(draw(HeunSampler(HeunConfig(steps=20, clip=False))))
