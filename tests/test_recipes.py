"""Recipes: parsing, validation messages naming recipe and field, overrides, nested specs, the shipped file."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict, Field

from genzoo.errors import RecipeError
from genzoo.recipes import (
    apply_overrides,
    get_recipe,
    load_recipes,
    parse_recipe,
    read_recipe_file,
    refresh,
    resolve,
    role_kind,
)
from genzoo.registry import Registry


class NetConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    width: int = Field(8, description="width")
    depth: int = Field(2, description="depth")


class DecConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    schedule: str = Field("linear", description="schedule")
    net: dict = Field(
        default_factory=lambda: {"type": "mlp"}, description="nested", json_schema_extra={"kind": "network"}
    )


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=1, description="steps")


class Empty(BaseModel):
    model_config = ConfigDict(extra="forbid")


@pytest.fixture
def reg() -> Registry:
    r = Registry()
    r.register("network", "mlp", config=NetConfig, factory=lambda c: c)
    r.register("decoder", "dec", config=DecConfig, factory=lambda c: c)
    r.register("sampler", "ddim", config=SamplerConfig, factory=lambda c: c)
    r.register("guidance", "cfg", config=Empty, factory=lambda c: c)
    r.register("pipeline", "toy", config=Empty, factory=lambda c: c)
    r.register("dataset", "toyset", config=Empty, factory=lambda c: c)
    return r


BODY = {
    "description": "toy",
    "pipeline": {"type": "toy"},
    "data": {"type": "toyset"},
    "components": {"decoder": {"type": "dec", "net": {"type": "mlp", "width": 4}}, "sampler": {"type": "ddim"}},
    "train": {"steps": 5},
}


def test_resolve_fills_defaults_at_every_depth(reg: Registry) -> None:
    out = resolve("toy", parse_recipe("toy", BODY), reg)
    assert out["components"]["decoder"] == {
        "type": "dec",
        "schedule": "linear",
        "net": {"type": "mlp", "width": 4, "depth": 2},
    }
    assert out["components"]["sampler"] == {"type": "ddim", "steps": 10}
    assert out["train"]["steps"] == 5 and "batch_size" in out["train"]


def test_refresh_fills_fields_added_since_a_recipe_was_stored(reg: Registry) -> None:
    today = resolve("toy", parse_recipe("toy", BODY), reg)
    stored = resolve("toy", parse_recipe("toy", BODY), reg)
    del stored["components"]["decoder"]["schedule"], stored["components"]["decoder"]["net"]["depth"]  # an older config
    assert stored != today and refresh(stored, reg) == today
    stored["components"]["decoder"]["removed_since"] = 1  # a field today's config rejects: kept, so it differs
    assert refresh(stored, reg)["components"]["decoder"]["removed_since"] == 1


def test_nested_spec_errors_name_the_path(reg: Registry) -> None:
    body = {**BODY, "components": {"decoder": {"type": "dec", "net": {"type": "mlp", "widht": 4}}}}
    with pytest.raises(RecipeError, match=r"recipe 'toy': components.decoder.net: .*'widht'"):
        resolve("toy", parse_recipe("toy", body), reg)


def test_structural_errors_name_recipe_and_field() -> None:
    with pytest.raises(RecipeError, match=r"recipe 'bad' \(f.yaml\): field 'component': unknown field"):
        parse_recipe("bad", {**BODY, "component": {}}, source="f.yaml")
    with pytest.raises(RecipeError, match=r"recipe 'bad': field 'pipeline': Field required"):
        parse_recipe("bad", {k: v for k, v in BODY.items() if k != "pipeline"})


def test_train_field_errors(reg: Registry) -> None:
    with pytest.raises(RecipeError, match=r"recipe 'toy': field 'train.stepz': unknown field"):
        resolve("toy", parse_recipe("toy", {**BODY, "train": {"stepz": 3}}), reg)


def test_overrides_swaps_and_sets(reg: Registry) -> None:
    r = apply_overrides(
        "toy",
        parse_recipe("toy", BODY),
        ["decoder.net.depth=5", "train.lr=0.5"],
        sampler="ddim",
        steps=7,
        guidance="cfg",
    )
    out = resolve("toy", r, reg)
    assert out["components"]["decoder"]["net"]["depth"] == 5
    assert out["components"]["sampler"]["steps"] == 7 and out["components"]["guidance"] == {"type": "cfg"}
    assert out["train"]["lr"] == 0.5
    with pytest.raises(RecipeError, match="'width' in recipe 'toy' is a value, not a section"):
        apply_overrides("toy", parse_recipe("toy", BODY), ["decoder.net.width.x=1"])
    with pytest.raises(RecipeError, match="has no guidance to take --scale; add --guidance NAME"):
        apply_overrides("toy", parse_recipe("toy", BODY), [], scale=2.0)
    with pytest.raises(RecipeError, match="--set expects path.to.field=value"):
        apply_overrides("toy", parse_recipe("toy", BODY), ["decoder.schedule"])


def test_role_kinds() -> None:
    assert role_kind("prior_sampler") == "sampler" and role_kind("text_encoder") == "encoder"
    with pytest.raises(RecipeError, match="component role 'thing' does not end in a component kind"):
        role_kind("thing")


def test_files_duplicates_and_bad_yaml(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    a.write_text("recipes:\n  ddpm-digits:\n    description: x\n    pipeline: {type: toy}\n    data: {type: toyset}\n")
    with pytest.raises(
        RecipeError, match=r"recipe 'ddpm-digits' is defined in both .*registry.yaml and .*a.yaml; rename one"
    ):
        load_recipes([a])
    b = tmp_path / "b.yaml"
    b.write_text("recipes: [1, 2")
    with pytest.raises(RecipeError, match="b.yaml is not valid YAML"):
        read_recipe_file(b)
    with pytest.raises(RecipeError, match="unknown recipe 'ddpm-digts'; did you mean 'ddpm-digits'"):
        get_recipe(load_recipes(), "ddpm-digts")


def test_every_shipped_recipe_resolves(loaded_registry: Registry) -> None:
    recipes = load_recipes()
    assert {"ddpm-digits", "ddpm-shapes", "iddpm-digits", "iddpm-shapes", "adm-digits", "adm-shapes"} <= set(recipes)
    for name, r in recipes.items():
        out = resolve(name, r, loaded_registry)
        role = "decoder" if "decoder" in out["components"] else "clip"
        nested = [v for k, v in out["components"][role].items() if isinstance(v, dict) and k != "text_tower"]
        assert nested and all(v["type"] for v in nested)  # nested network specs resolved


def test_swapping_to_the_same_type_keeps_its_fields(reg: Registry) -> None:
    body = {**BODY, "components": {**BODY["components"], "sampler": {"type": "ddim", "steps": 33}}}
    same = resolve("toy", apply_overrides("toy", parse_recipe("toy", body), [], sampler="ddim"), reg)
    assert (
        same["components"]["sampler"]["steps"] == 33
    )  # e.g. a trained classifier's config survives --guidance classifier
    other = apply_overrides("toy", parse_recipe("toy", body), [], sampler="ddim", guidance="none")
    assert "guidance" not in resolve("toy", other, reg)["components"]
