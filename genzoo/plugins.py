"""Plugins: pluggy hooks over the ``genzoo`` entry-point group.

Built-in plugins (``plugins/genzoo_*``) are declared as entry points of the group ``genzoo`` in
our own ``pyproject.toml``, so they load through exactly the same path as third-party ones, but
first: a component or recipe name a later plugin registers again is refused for that plugin alone
and reported, never taken from the one that had it. The loader is tolerant: a plugin that fails
to import or to register is recorded (``genzoo plugins`` shows why) and the rest load.
``GENZOO_STRICT_PLUGINS=1`` makes such failures (and refusals) fatal; ``GENZOO_DISABLE_PLUGINS=a,b``
skips plugins by entry-point name.
"""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pluggy

from genzoo.errors import MissingExtra, PluginError
from genzoo.registry import PluginRegistrar, Registry

GROUP = "genzoo"
hookspec = pluggy.HookspecMarker(GROUP)
hookimpl = pluggy.HookimplMarker(GROUP)


class Hookspecs:
    """The hooks a genzoo plugin may implement."""

    @hookspec
    def register_components(self, registry: PluginRegistrar) -> None:
        """Register this plugin's components.

        Call ``registry.register(kind, name, config=ConfigModel, factory=callable)`` once per
        component, or ``registry.register_module(module, ...)`` for the factories a module marks
        with ``@genzoo.registry.component(kind, name, config=ConfigModel)``. ``kind`` is one of
        ``genzoo.registry.KINDS``; ``name`` is kebab-case and unique across plugins; ``config`` is a
        pydantic model with ``extra='forbid'`` whose fields are documented; ``factory(config)`` (or
        ``factory(config, ctx)`` to receive a :class:`genzoo.registry.BuildContext`) returns the
        component. Registrations of one plugin are committed together: if any fails, none is kept.
        A name that a plugin loaded
        earlier holds (built-in plugins load first) is refused alone and reported.
        """

    @hookspec
    def register_recipes(self) -> list[str]:
        """Return paths of YAML recipe files this plugin ships (same schema as registry.yaml)."""


def require_extra(
    plugin: str, module: str, extra: str, *, package: str | None = None, error: type[ImportError] = ImportError
) -> None:
    """An optional plugin's guard, the first line of its hook: when ``module`` cannot be imported, raise ``error`` with
    the one line ``genzoo plugins`` shows (``package``: the distribution's name, default ``module``). Nothing is
    imported; ``error=MissingExtra`` keeps ``GENZOO_STRICT_PLUGINS=1`` from failing on an extra left out on purpose."""
    if importlib.util.find_spec(module) is None:
        raise error(f"the {plugin} plugin needs the {package or module} package: pip install 'genzoo[{extra}]'")


@dataclass
class PluginInfo:
    """What ``genzoo plugins`` reports about one plugin."""

    name: str
    module: str
    version: str
    registered: list[tuple[str, str]] = field(default_factory=list)
    recipes: list[str] = field(default_factory=list)
    error: str | None = None
    disabled: bool = False
    builtin: bool = False  # shipped by the genzoo distribution itself; loaded before every other plugin
    refused: list[str] = field(default_factory=list)  # components (and recipes) refused because the name was taken

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "module": self.module,
            "version": self.version,
            "builtin": self.builtin,
            "registered": [f"{k}:{n}" for k, n in self.registered],
            "recipes": self.recipes,
            "refused": self.refused,
            "error": self.error,
            "disabled": self.disabled,
        }


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _short_error(e: BaseException) -> str:
    frame = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    where = f" ({os.path.basename(frame.filename)}:{frame.lineno})" if frame else ""
    return f"{type(e).__name__}: {e}{where}"


def _dist_version(ep: md.EntryPoint) -> str:
    return ep.dist.version if getattr(ep, "dist", None) is not None else "unknown"


BUILTIN_DIST = "genzoo"  # the distribution whose entry points are the built-in plugins (plugins/genzoo_*)


def _dist_name(ep: md.EntryPoint) -> str:
    """The normalised name of the distribution that declares ``ep`` ("" when unknown)."""
    dist = getattr(ep, "dist", None)
    return (getattr(dist, "name", None) or "").lower().replace("_", "-")


def load_plugins(
    registry: Registry | None = None,
    *,
    extra: Iterable[tuple[str, ModuleType | object]] = (),
    strict: bool | None = None,
    disabled: Iterable[str] | None = None,
    entry_points: bool = True,
) -> tuple[Registry, list[PluginInfo]]:
    """Load every ``genzoo`` entry point (plus ``extra`` (name, plugin) pairs) into a registry."""
    registry = registry or Registry()
    strict = _env_flag("GENZOO_STRICT_PLUGINS") if strict is None else strict
    if disabled is None:
        disabled = [s.strip() for s in os.environ.get("GENZOO_DISABLE_PLUGINS", "").split(",") if s.strip()]
    disabled = set(disabled)
    pm = pluggy.PluginManager(GROUP)
    pm.add_hookspecs(Hookspecs)
    infos: list[PluginInfo] = []

    candidates: list[tuple[str, str, str, Any, bool]] = []  # name, module path, version, loader, built-in
    if entry_points:
        # built-ins first, so that whatever a third-party plugin registers under a taken name is what is refused
        eps = sorted(md.entry_points(group=GROUP), key=lambda e: (_dist_name(e) != BUILTIN_DIST, e.name))
        seen: dict[str, str] = {}
        for ep in eps:
            dist = _dist_name(ep)
            if ep.name in seen:
                if seen[ep.name] != dist:  # another distribution's plugin under a taken entry-point name
                    infos.append(
                        PluginInfo(
                            name=ep.name,
                            module=ep.value,
                            version=_dist_version(ep),
                            refused=[
                                f"entry point '{ep.name}' of distribution '{dist}' is refused: distribution "
                                f"'{seen[ep.name]}' "
                                f"already has a plugin named '{ep.name}'; rename its entry point"
                            ],
                        )
                    )
                continue  # else one distribution found twice on sys.path
            seen[ep.name] = dist
            candidates.append((ep.name, ep.value, _dist_version(ep), ep.load, dist == BUILTIN_DIST))
    for name, obj in extra:
        candidates.append(
            (
                name,
                getattr(obj, "__name__", type(obj).__name__),
                getattr(obj, "__version__", "unknown"),
                lambda o=obj: o,
                False,
            )
        )

    for name, module, version, load, builtin in candidates:
        info = PluginInfo(name=name, module=module, version=version, builtin=builtin)
        infos.append(info)
        if name in disabled:
            info.disabled = True
            continue
        try:
            plugin = load()
            pm.register(plugin, name=name)
            version = getattr(plugin, "__version__", None)
            if info.version == "unknown" and version:
                info.version = str(version)
            for impl in pm.hook.register_components.get_hookimpls():
                if impl.plugin_name == name:
                    registrar = registry.scoped(name)
                    impl.function(registry=registrar)
                    info.registered = registrar.commit()
                    info.refused += registrar.refused
            for impl in pm.hook.register_recipes.get_hookimpls():
                if impl.plugin_name == name:
                    info.recipes = [str(p) for p in impl.function()]
        except Exception as e:  # a broken plugin must not take the others down
            if pm.get_plugin(name) is not None:
                pm.unregister(name=name)
            info.error = _short_error(e)
            if strict and not isinstance(e, MissingExtra):
                raise PluginError(
                    f"plugin '{name}' ({module}) failed to load: {info.error}; "
                    "fix or uninstall it, or unset GENZOO_STRICT_PLUGINS to skip it"
                ) from e
    refused = [(i.name, r) for i in infos for r in i.refused]
    if strict and refused:
        raise PluginError(f"plugin '{refused[0][0]}': {refused[0][1]}; unset GENZOO_STRICT_PLUGINS to load the rest")
    return registry, infos


_DEFAULT: tuple[Registry, list[PluginInfo]] | None = None


def default_registry() -> Registry:
    """The registry with every installed plugin loaded (loaded once per process)."""
    return _load_default()[0]


def plugin_infos() -> list[PluginInfo]:
    return _load_default()[1]


def _load_default() -> tuple[Registry, list[PluginInfo]]:
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = load_plugins()
    return _DEFAULT


def reset_default_registry() -> None:
    """Forget the loaded plugins (tests, or after installing a plugin in a running process)."""
    global _DEFAULT
    _DEFAULT = None
