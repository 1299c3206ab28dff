"""Registry: registration, lookup, spec validation and every error message."""

from __future__ import annotations

import types

import pytest
from pydantic import BaseModel, ConfigDict, Field

from genzoo.errors import RegistryError
from genzoo.registry import Registry, component


class StepsConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(50, ge=1, description="number of steps")
    eta: float = Field(0.0, description="noise")


class Loose(BaseModel):
    steps: int = 1


class Thing:
    def __init__(self, cfg: StepsConfig) -> None:
        self.cfg = cfg


def test_build_from_spec_fills_defaults_and_records_spec(registry: Registry) -> None:
    registry.register("sampler", "ddim", config=StepsConfig, factory=Thing, plugin="p1")
    obj = registry.build("sampler", {"type": "ddim", "steps": 20})
    assert obj.cfg.steps == 20 and obj.cfg.eta == 0.0
    assert obj.genzoo_spec == {"type": "ddim", "steps": 20, "eta": 0.0}
    assert registry.build("sampler", "ddim").cfg.steps == 50


def test_factory_receives_context_when_it_asks(registry: Registry) -> None:
    seen = {}

    def factory(cfg: StepsConfig, ctx) -> Thing:
        seen["data"] = ctx.data
        seen["registry"] = ctx.registry
        return Thing(cfg)

    registry.register("decoder", "ctx-user", config=StepsConfig, factory=factory)
    registry.build("decoder", {"type": "ctx-user"}, data="SPEC")
    assert seen == {"data": "SPEC", "registry": registry}


def test_unknown_name_lists_valid_and_suggests_closest(registry: Registry) -> None:
    for name in ("ddim", "ddpm", "dpm-solver++"):
        registry.register("sampler", name, config=StepsConfig, factory=Thing)
    with pytest.raises(RegistryError) as e:
        registry.build("sampler", {"type": "dpm-solvr"})
    msg = str(e.value)
    assert "unknown sampler 'dpm-solvr'" in msg and "did you mean 'dpm-solver++'?" in msg
    assert "Valid: ddim, ddpm, dpm-solver++" in msg


def test_unknown_kind(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="unknown kind 'samplr'; did you mean 'sampler'"):
        registry.register("samplr", "x", config=StepsConfig, factory=Thing)


def test_duplicate_names_both_plugins(registry: Registry) -> None:
    registry.register("sampler", "ddim", config=StepsConfig, factory=Thing, plugin="alpha")
    with pytest.raises(RegistryError) as e:
        registry.register("sampler", "ddim", config=StepsConfig, factory=Thing, plugin="beta")
    assert "registered by both plugin 'alpha' and plugin 'beta'" in str(e.value)


def test_invalid_field_names_component_field_and_value(registry: Registry) -> None:
    registry.register("sampler", "ddim", config=StepsConfig, factory=Thing)
    with pytest.raises(RegistryError) as e:
        registry.build("sampler", {"type": "ddim", "steps": 0})
    assert "sampler 'ddim': field 'steps'" in str(e.value) and "got 0" in str(e.value)
    with pytest.raises(RegistryError, match="field 'etaa': unknown field"):
        registry.build("sampler", {"type": "ddim", "etaa": 1})


def test_spec_without_type(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="has no 'type' field; add `type: NAME`"):
        registry.build("sampler", {"steps": 3})


def test_names_must_be_kebab_case_and_config_strict(registry: Registry) -> None:
    with pytest.raises(RegistryError, match="not kebab-case"):
        registry.register("sampler", "DDIM_2", config=StepsConfig, factory=Thing)
    with pytest.raises(RegistryError, match="extra='forbid'"):
        registry.register("sampler", "loose", config=Loose, factory=Thing)


def test_scoped_registration_is_all_or_nothing(registry: Registry) -> None:
    scoped = registry.scoped("second")
    scoped.register("sampler", "fresh", config=StepsConfig, factory=Thing)
    scoped.register("sampler", "Not_Kebab", config=StepsConfig, factory=Thing)
    with pytest.raises(RegistryError, match="is not kebab-case"):
        scoped.commit()
    assert registry.names("sampler") == []  # 'fresh' was rolled back


def test_a_taken_name_is_refused_alone(registry: Registry) -> None:
    """Issue 21.3: a later plugin loses the colliding component only; the earlier one keeps it."""
    registry.register("sampler", "taken", config=StepsConfig, factory=Thing, plugin="first")
    scoped = registry.scoped("second")
    scoped.register("sampler", "fresh", config=StepsConfig, factory=Thing)
    scoped.register("sampler", "taken", config=StepsConfig, factory=Thing)
    assert scoped.commit() == [("sampler", "fresh")]
    assert registry.get("sampler", "taken").plugin == "first" and registry.get("sampler", "fresh").plugin == "second"
    assert len(scoped.refused) == 1 and "both plugin 'first' and plugin 'second'" in scoped.refused[0]


def test_marks_register_only_through_register_module(registry: Registry) -> None:
    """A mark registers nothing by itself; register_module takes the module's own marks in source order, stacked
    marks each, and skips a marked factory the module only imported."""
    module = types.ModuleType("fake_plugin_module")

    @component("sampler", "second-name", config=StepsConfig)
    @component("sampler", "first-name", config=StepsConfig)
    class Marked(Thing):
        pass

    def make_guidance(cfg: StepsConfig) -> str:
        return f"guidance {cfg.steps}"

    Marked.__module__ = make_guidance.__module__ = module.__name__
    module.Marked = Marked
    module.make = component("guidance", "made", config=StepsConfig, factory=lambda cfg: ("wrapped", cfg.steps))(
        make_guidance
    )
    module.Imported = component("sampler", "elsewhere", config=StepsConfig)(type("Imported", (Thing,), {}))
    assert registry.names("sampler") == [] and registry.names("guidance") == []
    scoped = registry.scoped("fake")
    scoped.register_module(module)
    assert scoped.commit() == [("sampler", "first-name"), ("sampler", "second-name"), ("guidance", "made")]
    assert isinstance(registry.build("sampler", {"type": "second-name", "steps": 3}), Marked)
    assert registry.build("guidance", {"type": "made", "steps": 4}) == ("wrapped", 4)  # factory= overrides the object
    assert "elsewhere" not in registry.names("sampler")  # Imported.__module__ is this test's, not the module's


def test_describe_fields(registry: Registry) -> None:
    registry.register("sampler", "ddim", config=StepsConfig, factory=Thing)
    rows = {r["field"]: r for r in registry.get("sampler", "ddim").describe_fields()}
    assert rows["steps"]["default"] == 50 and rows["steps"]["description"] == "number of steps"


def test_import_asks_for_a_format_when_several_importers_recognise_the_source(registry: Registry, tmp_path) -> None:
    """Two importers that both accept a file: `genzoo import` refuses to guess (plugin order would decide) and
    names both; --format picks one, and a file nobody recognises lists the installed formats."""
    from genzoo import api
    from genzoo.errors import GenzooError

    class Pick(BaseModel):
        model_config = ConfigDict(extra="forbid")

    class Importer:
        def __init__(self, cfg: Pick, accepts: str) -> None:
            self.accepts = accepts

        def detect(self, source: str) -> bool:
            return source.endswith(self.accepts)

        def run(self, source: str, out, *, adapter: bool = False, data=None):
            return f"{self.accepts}:{source}"

    registry.register("importer", "alpha", config=Pick, factory=lambda cfg: Importer(cfg, ".pt"), plugin="p1")
    registry.register("importer", "beta", config=Pick, factory=lambda cfg: Importer(cfg, "both.pt"), plugin="p2")
    with pytest.raises(GenzooError, match=r"recognised by several importers \(alpha, beta\); pick one with --format"):
        api.import_model("both.pt", tmp_path / "a", registry=registry)
    assert api.import_model("both.pt", tmp_path / "b", format="beta", registry=registry).name == "both.pt:both.pt"
    assert api.import_model("one.pt", tmp_path / "c", registry=registry).name == ".pt:one.pt"
    with pytest.raises(GenzooError, match="no importer recognises x.bin; pass --format with one of: alpha, beta"):
        api.import_model("x.bin", tmp_path / "d", registry=registry)
