"""Recipes: named compositions in ``registry.yaml``, validated, overridable, resolved.

A recipe names a pipeline (the family), a dataset, one spec per component role and the training
settings::

    ddpm-shapes:
      description: DDPM (Ho et al. 2020) on shapes 32x32.
      pipeline: {type: diffusion}
      data: {type: shapes, image_size: 32}
      components:
        prior: {type: gaussian}
        decoder: {type: diffusion-decoder, schedule: linear, denoiser: {type: unet}}
        sampler: {type: ddpm, steps: 1000}
      train: {steps: 2000, batch_size: 64, lr: 2.0e-4}

A role's kind is the role itself (``sampler``) or its last ``_`` part (``prior_sampler`` is a
sampler). Resolving validates every spec against its component's config and fills defaults, so
the resolved recipe is exactly what gets built and saved with a checkpoint.
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from genzoo.errors import GenzooError, RecipeError
from genzoo.interfaces import Pipeline, check_composition
from genzoo.priors import bind_priors
from genzoo.registry import KINDS, Registry
from genzoo.swaps import apply_swaps

REPO_RECIPES = Path(__file__).resolve().parent.parent / "registry.yaml"
PACKAGED_RECIPES = Path(__file__).resolve().parent / "registry.yaml"


class SampleConfig(BaseModel):
    """Defaults for ``genzoo sample`` and the sample grids written during training."""

    model_config = ConfigDict(extra="forbid")
    n: int = Field(64, ge=1, description="number of samples in a grid")
    seed: int = Field(0, description="seed of the sampling generator")


class Recipe(BaseModel):
    """One named composition."""

    model_config = ConfigDict(extra="forbid")
    description: str = Field(..., description="one line: the model, its paper, the data")
    pipeline: dict[str, Any] = Field(..., description="the family: {type: NAME, ...fields}")
    data: dict[str, Any] = Field(..., description="the dataset: {type: NAME, ...fields}")
    components: dict[str, dict[str, Any] | None] = Field(
        default_factory=dict, description="role -> component spec {type: NAME, ...fields}; null removes a role"
    )
    train: dict[str, Any] = Field(default_factory=dict, description="TrainConfig fields")
    sample: SampleConfig = Field(default_factory=SampleConfig, description="sampling defaults")


def role_kind(role: str) -> str:
    """``sampler`` -> sampler; ``prior_sampler`` -> sampler; ``text_encoder`` -> encoder."""
    if role in KINDS:
        return role
    tail = role.rsplit("_", 1)[-1]
    if tail in KINDS:
        return tail
    raise RecipeError(
        f"component role '{role}' does not end in a component kind; name it like 'prior_sampler' "
        f"or 'text_encoder' (kinds: {', '.join(KINDS)})"
    )


# --------------------------------------------------------------------------- files


def read_recipe_file(path: str | Path) -> dict[str, Recipe]:
    """Parse and validate (structurally) every recipe of a YAML file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except yaml.YAMLError as e:
        raise RecipeError(f"recipe file {path} is not valid YAML: {e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("recipes"), dict):
        raise RecipeError(f"recipe file {path} must hold a mapping `recipes:` of name -> recipe")
    out = {}
    for name, body in raw["recipes"].items():
        out[str(name)] = parse_recipe(str(name), body, source=str(path))
    return out


def parse_recipe(name: str, body: Any, *, source: str = "") -> Recipe:
    where = f" ({source})" if source else ""
    if not isinstance(body, dict):
        raise RecipeError(f"recipe '{name}'{where} must be a mapping, got {type(body).__name__}")
    try:
        return Recipe.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise RecipeError(f"recipe '{name}'{where}: field '{loc}': {msg}") from None


def load_recipes(
    extra_files: Iterable[str | Path] = (),
    *,
    plugin_files: Iterable[str | Path | tuple[str, str | Path]] = (),
    refused: list[tuple[str, str]] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Recipe]:
    """Recipes from ``registry.yaml``, plugins, then user files (later files may not redefine).

    ``plugin_files`` are paths or (plugin name, path) pairs; ``sources`` collects each recipe's plugin or file
    name. A plugin's recipe whose name is taken, or a plugin's
    file that does not parse, is refused alone ((plugin, sentence) appended to ``refused``) so that it cannot break
    every recipe command; a user's file (``--recipes``) that redefines a name is an error: the user asked for it.
    """
    main = REPO_RECIPES if REPO_RECIPES.exists() else PACKAGED_RECIPES
    files: list[tuple[str | None, Path]] = [(None, main)] if main.exists() else []
    files += [(i[0], Path(i[1])) if isinstance(i, tuple) else ("a plugin", Path(i)) for i in plugin_files]
    files += [(None, Path(p)) for p in extra_files]
    recipes: dict[str, Recipe] = {}
    origin: dict[str, Path] = {}
    for plugin, f in files:
        try:
            found = read_recipe_file(f)
        except RecipeError as e:
            if plugin is None:
                raise
            if refused is not None:
                refused.append((plugin, f"recipes of plugin '{plugin}' are refused: {e}"))
            continue
        for name, r in found.items():
            if name in recipes and plugin is not None:
                if refused is not None:
                    refused.append(
                        (
                            plugin,
                            f"recipe '{name}' of plugin '{plugin}' ({f}) is refused: {origin[name]} "
                            "already defines it; rename it in the plugin",
                        )
                    )
                continue
            if name in recipes:
                raise RecipeError(f"recipe '{name}' is defined in both {origin[name]} and {f}; rename one")
            recipes[name] = r
            origin[name] = f
            if sources is not None:  # where `genzoo list` says a recipe comes from: its plugin, or its file
                sources[name] = plugin or f.name
    return recipes


def get_recipe(recipes: Mapping[str, Recipe], name: str) -> Recipe:
    if name not in recipes:
        close = difflib.get_close_matches(name, list(recipes), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"unknown recipe '{name}'{hint} Valid: {', '.join(sorted(recipes)) or '(none)'}")
    return recipes[name]


# --------------------------------------------------------------------------- overrides


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``decoder.denoiser.model_channels=128`` -> (path, value parsed as YAML)."""
    if "=" not in text:
        raise RecipeError(f"--set expects path.to.field=value, got {text!r}")
    path, value = text.split("=", 1)
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise RecipeError(f"--set {text!r} names no field")
    try:
        return keys, yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return keys, value


def apply_overrides(name: str, recipe: Recipe, sets: Iterable[str] = (), **swaps: Any) -> Recipe:
    """Apply swap flags (:data:`genzoo.swaps.SWAPS`: ``sampler=``, ``prior_steps=``, ``temperature=``, ...), then
    ``--set`` assignments; a ``--set`` path not starting at a recipe key is a component role. As with the swap flags,
    a ``...type=NEW`` that changes a spec's type starts it afresh (the old type's fields do not apply to the new one)
    and is applied before the other assignments, so ``--set decoder.denoiser.type=X --set decoder.denoiser.f=1``
    sets X's field in either order."""
    body = recipe.model_dump(mode="json")
    apply_swaps(name, body.setdefault("components", {}), swaps)
    parsed = [(text, *parse_assignment(text)) for text in sets]
    for text, keys, value in sorted(parsed, key=lambda p: p[1][-1] != "type"):
        if keys[0] not in Recipe.model_fields:
            keys = ["components", *keys]
        node = body
        for k in keys[:-1]:
            nxt = node.get(k) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise RecipeError(f"--set {text!r}: '{k}' in recipe '{name}' is a value, not a section")
            node = nxt
        if keys[-1] == "type" and node.get("type") not in (None, value):  # a new type: its own fields only
            node.clear()
        node[keys[-1]] = value
    return parse_recipe(name, body, source="after --set")


# --------------------------------------------------------------------------- resolve and build


def nested_kinds(config: type[BaseModel]) -> dict[str, str]:
    """Fields of a config that hold a nested component spec: declared ``Field(json_schema_extra={"kind": K})``, as
    :func:`genzoo.registry.spec_field` does."""
    out = {}
    for field, info in config.model_fields.items():
        extra = info.json_schema_extra
        if isinstance(extra, dict) and isinstance(extra.get("kind"), str):
            out[field] = extra["kind"]
    return out


def resolve_spec(kind: str, s: Any, registry: Registry, where: str) -> dict[str, Any]:
    """One component spec validated against its config, every default (nested ones too) filled in."""
    try:
        cfg = registry.config(kind, s, where=f"{where}: ")
    except GenzooError as e:
        raise RecipeError(str(e)) from None
    out = {"type": s["type"] if isinstance(s, Mapping) else s, **cfg.model_dump(mode="json")}
    for field, sub_kind in nested_kinds(type(cfg)).items():
        if isinstance(out.get(field), Mapping):
            out[field] = resolve_spec(sub_kind, out[field], registry, f"{where}.{field}")
    return out


def resolve(name: str, recipe: Recipe, registry: Registry) -> dict[str, Any]:
    """Validate every spec against its component config and fill all defaults."""
    from genzoo.training.config import TrainConfig

    out: dict[str, Any] = {"name": name, "description": recipe.description}
    out["pipeline"] = resolve_spec("pipeline", recipe.pipeline, registry, f"recipe '{name}': pipeline")
    out["data"] = resolve_spec("dataset", recipe.data, registry, f"recipe '{name}': data")
    out["components"] = {
        role: resolve_spec(role_kind(role), s, registry, f"recipe '{name}': components.{role}")
        for role, s in recipe.components.items()
        if s is not None
    }
    try:
        out["train"] = TrainConfig.model_validate(recipe.train).model_dump(mode="json")
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
        raise RecipeError(f"recipe '{name}': field 'train.{loc}': {msg}") from None
    out["sample"] = recipe.sample.model_dump(mode="json")
    return out


def refresh(resolved: Mapping[str, Any], registry: Registry) -> dict[str, Any]:
    """A stored resolved recipe (a checkpoint's) resolved again by today's registry, so that fields added to a
    component since it was saved hold their defaults and it compares equal to today's resolution of the same
    recipe. A spec today's registry rejects (a type or field since removed) is kept as stored: it differs."""
    out = copy.deepcopy(dict(resolved))

    def again(s: Any, role: str) -> Any:
        try:
            return resolve_spec(role_kind(role), s, registry, "stored recipe") if isinstance(s, Mapping) else s
        except GenzooError:
            return s

    # a key the stored recipe lacks stays absent (a Trainer given a partial recipe through the Python API)
    for key, role in (("pipeline", "pipeline"), ("data", "dataset")):
        if key in out:
            out[key] = again(out[key], role)
    if "components" in out:
        out["components"] = {role: again(s, role) for role, s in out["components"].items()}
    return out


def build_pipeline(resolved: Mapping[str, Any], registry: Registry, data_spec: Any) -> Pipeline:
    """Build every component of a resolved recipe, check they fit, and wire the pipeline."""
    name = resolved.get("name", "?")
    components = {}
    for role, s in resolved["components"].items():
        components[role] = registry.build(
            role_kind(role), copy.deepcopy(s), data=data_spec, where=f"recipe '{name}': components.{role}: "
        )
    bind_priors(components)
    for role, comp in components.items():  # a guidance may use a sibling (CLIP guidance: the recipe's clip)
        if callable(getattr(comp, "bind_siblings", None)):
            comp.bind_siblings(components, where=f"recipe '{name}': components.{role}: ")
    check_composition(components)
    pipeline = registry.build(
        "pipeline",
        copy.deepcopy(resolved["pipeline"]),
        data=data_spec,
        components=components,
        where=f"recipe '{name}': pipeline: ",
    )
    pipeline.resolved_recipe = dict(resolved)
    return pipeline
