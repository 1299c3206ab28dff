"""Plugin loading through real entry points: good, broken, disabled, strict, collisions."""

from __future__ import annotations

import importlib
import sys
import textwrap
from pathlib import Path

import pytest

from genzoo.errors import PluginError
from genzoo.plugins import load_plugins

GOOD = '''
from pydantic import BaseModel, ConfigDict, Field
import genzoo.plugins

__version__ = "1.2.3"

class HalveConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    factor: float = Field(0.5, description="multiplier")

class Halve:
    """Multiplies by a factor."""
    def __init__(self, cfg):
        self.factor = cfg.factor

@genzoo.plugins.hookimpl
def register_components(registry):
    registry.register("metric", "{name}", config=HalveConfig, factory=Halve)
'''


def make_dist(site: Path, dist: str, module: str, source: str, group_name: str | None = None) -> None:
    """A minimal installed distribution: a module plus a dist-info with a genzoo entry point."""
    site.mkdir(parents=True, exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[genzoo]\n{group_name or dist} = {module}\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    s = tmp_path / "site"
    s.mkdir()
    monkeypatch.syspath_prepend(str(s))
    yield s
    for name in list(sys.modules):
        if name.startswith("zz_"):
            del sys.modules[name]
    importlib.invalidate_caches()


def infos_by_name(infos):
    return {i.name: i for i in infos}


def test_good_plugin_registers_with_its_name_and_version(site: Path) -> None:
    make_dist(site, "zz-good", "zz_good", GOOD.replace("{name}", "halve"))
    reg, infos = load_plugins(strict=False, disabled=[])
    info = infos_by_name(infos)["zz-good"]
    assert info.error is None and info.version == "1.2.3"
    assert info.registered == [("metric", "halve")]
    entry = reg.get("metric", "halve")
    assert entry.plugin == "zz-good"
    assert reg.build("metric", {"type": "halve", "factor": 0.25}).factor == 0.25


def test_broken_plugin_is_recorded_and_others_load(site: Path) -> None:
    make_dist(site, "zz-good", "zz_good", GOOD.replace("{name}", "halve"))
    make_dist(site, "zz-broken", "zz_broken", "import this_module_does_not_exist_anywhere\n")
    reg, infos = load_plugins(strict=False, disabled=[])
    broken = infos_by_name(infos)["zz-broken"]
    assert broken.error.startswith("ModuleNotFoundError: No module named 'this_module_does_not_exist_anywhere'")
    assert reg.get("metric", "halve").plugin == "zz-good"


def test_plugin_whose_hook_raises_registers_nothing(site: Path) -> None:
    src = (
        GOOD.replace("{name}", "half-ok")
        + """
@genzoo.plugins.hookimpl
def register_recipes():
    raise RuntimeError("boom in recipes")
"""
    )
    make_dist(site, "zz-halfway", "zz_halfway", src)
    reg, infos = load_plugins(strict=False, disabled=[])
    assert "RuntimeError: boom in recipes" in infos_by_name(infos)["zz-halfway"].error
    assert "half-ok" in reg.names("metric")  # components committed before the recipes hook failed


def test_disabled_plugin_is_skipped(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "zz-good", "zz_good", GOOD.replace("{name}", "halve"))
    monkeypatch.setenv("GENZOO_DISABLE_PLUGINS", "zz-good, other")
    reg, infos = load_plugins(strict=False)
    assert infos_by_name(infos)["zz-good"].disabled
    assert "halve" not in reg.names("metric")
    assert "zz_good" not in sys.modules  # a disabled plugin is not even imported


def test_strict_mode_makes_errors_fatal(site: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_dist(site, "zz-broken", "zz_broken", "raise ValueError('bad plugin')\n")
    monkeypatch.setenv("GENZOO_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"plugin 'zz-broken' \(zz_broken\) failed to load: ValueError: bad plugin"):
        load_plugins()


def test_name_collision_names_both_plugins(site: Path) -> None:
    make_dist(site, "zz-a", "zz_a", GOOD.replace("{name}", "same"))
    make_dist(site, "zz-b", "zz_b", GOOD.replace("{name}", "same"))
    reg, infos = load_plugins(strict=False, disabled=[])
    b = infos_by_name(infos)["zz-b"]
    assert b.error is None and b.registered == []  # refused, reported, not a failure of the whole plugin
    assert "metric 'same' is registered by both plugin 'zz-a' and plugin 'zz-b'" in b.refused[0]
    assert reg.get("metric", "same").plugin == "zz-a"
    with pytest.raises(PluginError, match="registered by both plugin 'zz-a' and plugin 'zz-b'"):
        load_plugins(strict=True, disabled=[])


def test_builtin_plugins_load_through_entry_points() -> None:
    _, infos = load_plugins(strict=True, disabled=[])
    names = {i.name for i in infos}
    assert {"data", "diffusion"} <= names
    assert all(i.module.startswith("genzoo_") for i in infos if i.name in ("data", "diffusion"))


def test_plugin_ships_recipes(tmp_path: Path) -> None:
    from genzoo.plugins import hookimpl
    from genzoo.recipes import load_recipes

    extra = tmp_path / "extra.yaml"
    extra.write_text(
        "recipes:\n  my-ddpm:\n    description: from a plugin\n    pipeline: {type: diffusion}\n    data: "
        "{type: digits}\n"
    )

    class Shipping:
        @hookimpl
        def register_recipes(self):
            return [str(extra)]

    _, infos = load_plugins(extra=[("shipping", Shipping())], entry_points=False, strict=True)
    assert infos[0].recipes == [str(extra)]
    sources: dict[str, str] = {}
    recipes = load_recipes(plugin_files=[("shipping", infos[0].recipes[0])], sources=sources)
    assert recipes["my-ddpm"].description == "from a plugin" and "ddpm-digits" in recipes
    assert (sources["my-ddpm"], sources["ddpm-digits"]) == ("shipping", "registry.yaml")  # what `genzoo list` shows


# --------------------------------------------------------------------------- issue 21.3: built-ins load first

SHADOW = '''
from pydantic import BaseModel, ConfigDict
import genzoo.plugins
from genzoo.diffusion.samplers import DDIMConfig, DDIMSampler

class OwnConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

class Own:
    """The plugin's own metric."""
    def __init__(self, cfg):
        pass

@genzoo.plugins.hookimpl
def register_components(registry):
    registry.register("sampler", "ddim", config=DDIMConfig, factory=DDIMSampler)  # the built-in diffusion plugin's name
    registry.register("metric", "own-metric", config=OwnConfig, factory=Own)

@genzoo.plugins.hookimpl
def register_recipes():
    return [RECIPES]
'''

SHADOW_RECIPES = """
recipes:
  ddpm-shapes:
    description: a plugin's recipe under a built-in's name
    pipeline: {type: diffusion}
    data: {type: digits}
  own-recipe:
    description: the plugin's own recipe
    pipeline: {type: diffusion}
    data: {type: digits}
"""


@pytest.mark.parametrize("entry", ["aa-shadow", "zz-shadow"])  # sorts before and after the built-in `diffusion`
def test_a_plugin_cannot_knock_out_a_builtin(site: Path, entry: str) -> None:
    from genzoo.recipes import load_recipes

    recipes = site / "shadow.yaml"
    recipes.write_text(SHADOW_RECIPES)
    make_dist(site, "zz-shadow", "zz_shadow", SHADOW.replace("RECIPES", repr(str(recipes))), group_name=entry)
    reg, infos = load_plugins(strict=False, disabled=[])
    by = infos_by_name(infos)
    assert by["diffusion"].builtin and by["diffusion"].error is None and not by["diffusion"].refused
    assert ("sampler", "ddim") in by["diffusion"].registered and reg.get("sampler", "ddim").plugin == "diffusion"
    assert [i.name for i in infos].index("diffusion") < [i.name for i in infos].index(entry)
    shadow = by[entry]
    assert not shadow.builtin and shadow.error is None
    assert shadow.registered == [("metric", "own-metric")]  # the rest of the newcomer still loads
    assert shadow.refused == [
        "sampler 'ddim' is registered by both plugin 'diffusion' and plugin '"
        + entry
        + "'; the one from '"
        + entry
        + "' is refused (rename it, or disable a plugin with "
        "GENZOO_DISABLE_PLUGINS=" + entry + ")"
    ]
    refused: list = []
    recipes_now = load_recipes(plugin_files=[(i.name, f) for i in infos for f in i.recipes], refused=refused)
    assert recipes_now["ddpm-shapes"].description.startswith("DDPM") and "own-recipe" in recipes_now
    assert [(p, why.split(" is refused")[0]) for p, why in refused] == [
        (entry, f"recipe 'ddpm-shapes' of plugin '{entry}' ({recipes})")
    ]
    with pytest.raises(PluginError, match=f"plugin '{entry}': sampler 'ddim' is registered by both"):
        load_plugins(strict=True, disabled=[])


def test_a_third_party_entry_point_under_a_builtin_name_is_refused(site: Path) -> None:
    make_dist(site, "zz-imposter", "zz_imposter", GOOD.replace("{name}", "imposter"), group_name="diffusion")
    reg, infos = load_plugins(strict=False, disabled=[])
    diffusion = [i for i in infos if i.name == "diffusion"]
    assert sorted(i.builtin for i in diffusion) == [False, True]
    assert "already has a plugin named 'diffusion'" in next(i for i in diffusion if not i.builtin).refused[0]
    assert "ddim" in reg.names("sampler") and "imposter" not in reg.names("metric")
    assert "zz_imposter" not in sys.modules


def test_recipe_commands_survive_a_plugin_shipping_a_builtin_recipe_name(site: Path) -> None:
    """Through the command line: the recipes work and `genzoo plugins` says what was refused."""
    import os
    import subprocess

    recipes = site / "shadow.yaml"
    recipes.write_text(SHADOW_RECIPES)
    make_dist(site, "zz-shadow", "zz_shadow", SHADOW.replace("RECIPES", repr(str(recipes))), group_name="aa-shadow")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join(p for p in [str(site), os.environ.get("PYTHONPATH")] if p),
    }
    env.pop("GENZOO_STRICT_PLUGINS", None)
    r = subprocess.run(
        [sys.executable, "-m", "genzoo", "plugins"], capture_output=True, text=True, env=env, timeout=120
    )
    assert r.returncode == 0, r.stderr
    assert "aa-shadow 1.2.3 (zz_shadow) ok, 2 refused" in r.stdout
    assert "refused: sampler 'ddim' is registered by both plugin 'diffusion' and plugin 'aa-shadow'" in r.stdout
    assert "refused: recipe 'ddpm-shapes' of plugin 'aa-shadow'" in r.stdout
    r = subprocess.run(
        [sys.executable, "-m", "genzoo", "info", "ddpm-shapes", "--resolved", "--sampler", "ddim"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert '"type": "ddim"' in r.stdout and "ddpm-shapes" in r.stdout
