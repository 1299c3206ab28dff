"""The registry of typed components.

A component is registered under a kind and a kebab-case name with a pydantic config model and a
factory; it is built from a spec ``{"type": NAME, **fields}``. Plugins register into the
registry from their ``register_components`` hook (see :mod:`genzoo.plugins`); nothing registers
by import side effect.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from genzoo.errors import RegistryError

KINDS: dict[str, str] = {
    "pipeline": "a family: wires components together and owns the training objective",
    "encoder": "turns a condition (class, caption, image) into tensors the prior and decoder consume",
    "prior": "draws a latent z given the encoded condition",
    "decoder": "maps a latent z (and the condition) to an image",
    "sampler": "drives an iterative model (diffusion denoiser or token logits) to a sample",
    "guidance": "steers a sampler toward the condition",
    "network": "a neural network used inside components (U-Net, GPT, discriminator, classifier)",
    "dataset": "training and evaluation data",
    "tokenizer": "turns captions into tokens",
    "clip": "paired image and text encoders into one embedding space (guidance, reranking, DALL·E 2)",
    "metric": "scores samples against data",
    "importer": "turns a foreign checkpoint or pipeline into a genzoo run directory (`genzoo import`)",
    "app": "serves trained runs over HTTP (`genzoo serve`: a web page and its API)",
    "logger": "records a run's training curves, sample grids and evaluations (metrics.jsonl, TensorBoard, W&B)",
}

_NAME = re.compile(r"^[a-z0-9]+(?:[-.][a-z0-9]+)*\+*$")  # kebab-case; a trailing "++" is allowed


@dataclass(frozen=True)
class BuildContext:
    """What a factory may need beyond its config: the registry (to build nested specs) and data."""

    registry: Registry
    data: Any = None  # a genzoo.data.DataSpec when the component is built for a dataset
    components: Mapping[str, Any] = field(default_factory=dict)  # built siblings (for pipelines)


@dataclass(frozen=True)
class Entry:
    """One registered component."""

    kind: str
    name: str
    config: type[BaseModel]
    factory: Callable[..., Any]
    plugin: str
    summary: str
    wants_context: bool

    def describe_fields(self) -> list[dict[str, Any]]:
        """Each config field with its type, default and description (for ``genzoo info``)."""
        rows = []
        for fname, f in self.config.model_fields.items():
            rows.append(
                {
                    "field": fname,
                    "type": getattr(f.annotation, "__name__", str(f.annotation)).replace("typing.", ""),
                    "default": None if f.is_required() else f.get_default(call_default_factory=True),
                    "required": f.is_required(),
                    "description": f.description or "",
                }
            )
        return rows


def own_doc(obj: Any) -> str:
    """``obj``'s own docstring, never one inherited from a base class (pydantic's, torch's)."""
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def _summary(obj: Any) -> str:
    return own_doc(obj).split("\n\n")[0].replace("\n", " ")


def _summary_of(factory: Callable[..., Any], config: type[BaseModel]) -> str:
    """The factory's own docstring (a class factory is the component), else the config's."""
    return _summary(factory) or _summary(config)


_MARKS = "__genzoo_components__"  # where a factory carries its marks


def component(
    kind: str, name: str, *, config: type[BaseModel], factory: Callable[..., Any] | None = None
) -> Callable[[Any], Any]:
    """Mark the decorated function or class as the component ``kind``/``name`` built from ``config`` by it (or by
    ``factory``). timm's ``@register_model`` without its import side effect: a mark registers nothing until a
    plugin's hook passes the module to :meth:`PluginRegistrar.register_module`. Marks stack."""

    def mark(obj: Any) -> Any:
        marks = obj.__dict__.get(_MARKS, ())
        setattr(obj, _MARKS, (*marks, (kind, name, config, factory or obj)))
        return obj

    return mark


def marked(module: Any) -> list[tuple[str, str, type[BaseModel], Callable[..., Any]]]:
    """The components marked with :func:`component` in ``module`` (defined there, not imported), in source order."""
    found = []
    for obj in vars(module).values():
        if getattr(obj, "__module__", None) == module.__name__ and hasattr(obj, "__dict__"):
            found.extend(obj.__dict__.get(_MARKS, ()))
    return found


def registered_name(built: Any) -> str:
    """The name the component ``built`` was built under (its spec's ``type``); its class name if built by hand."""
    spec = getattr(built, "genzoo_spec", None)
    return spec["type"] if isinstance(spec, Mapping) and "type" in spec else type(built).__name__


def spec_field(kind: str, default: Any, description: str) -> Any:
    """A config field holding a nested component spec of ``kind`` (``{type: NAME, ...}``), which a recipe resolves and
    builds like a top-level one (``genzoo.recipes.nested_kinds`` finds it). ``default``: the spec (a fresh copy per
    config), None (optional) or ``...`` (required)."""
    extra = {"kind": kind}
    if isinstance(default, Mapping):
        spec = dict(default)
        return Field(default_factory=lambda: copy.deepcopy(spec), description=description, json_schema_extra=extra)
    return Field(default, description=description, json_schema_extra=extra)


def _format_validation(kind: str, name: str, err: ValidationError, where: str = "") -> str:
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(spec)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown field"
    inp = first.get("input")
    got = "" if first["type"] in ("missing", "extra_forbidden") else f" (got {inp!r})"
    more = f" and {len(err.errors()) - 1} more problem(s)" if len(err.errors()) > 1 else ""
    if not first["loc"] and first["type"] == "value_error":  # a check across fields: its own sentence names them
        return f"{where}{kind} '{name}': {first['ctx']['error']}{more}; see `genzoo info {kind}:{name}` for its fields"
    return f"{where}{kind} '{name}': field '{loc}': {msg}{got}{more}; see `genzoo info {kind}:{name}` for its fields"


class Registry:
    """Components by kind and name, with the plugin that provided each."""

    def __init__(self) -> None:
        self._entries: dict[str, dict[str, Entry]] = {k: {} for k in KINDS}

    # ------------------------------------------------------------------ registration
    def register(
        self,
        kind: str,
        name: str,
        *,
        config: type[BaseModel],
        factory: Callable[..., Any],
        plugin: str = "genzoo",
        summary: str | None = None,
    ) -> None:
        """Register ``factory(config_instance[, ctx])`` under ``kind`` and ``name``.

        The factory receives a :class:`BuildContext` as its second argument when it declares a
        parameter named ``ctx``.
        """
        if kind not in self._entries:
            raise RegistryError(self._unknown("kind", kind, list(self._entries)))
        if not _NAME.match(name):
            raise RegistryError(f"{kind} name {name!r} from plugin '{plugin}' is not kebab-case (e.g. 'dpm-solver++')")
        if not (isinstance(config, type) and issubclass(config, BaseModel)):
            raise RegistryError(f"{kind} '{name}' from plugin '{plugin}': config must be a pydantic BaseModel subclass")
        if config.model_config.get("extra") != "forbid":
            raise RegistryError(
                f"{kind} '{name}' from plugin '{plugin}': its config {config.__name__} must set "
                "model_config = ConfigDict(extra='forbid') so misspelt fields are caught"
            )
        if name in self._entries[kind]:
            other = self._entries[kind][name].plugin
            raise RegistryError(
                f"{kind} '{name}' is registered by both plugin '{other}' and plugin '{plugin}'; "
                f"rename one of them or disable one with GENZOO_DISABLE_PLUGINS={plugin}"
            )
        wants_ctx = "ctx" in inspect.signature(factory).parameters
        self._entries[kind][name] = Entry(
            kind, name, config, factory, plugin, summary or _summary_of(factory, config), wants_ctx
        )

    def scoped(self, plugin: str) -> PluginRegistrar:
        """A view that stamps ``plugin`` on every registration and commits them together."""
        return PluginRegistrar(self, plugin)

    # ------------------------------------------------------------------ lookup
    def kinds(self) -> list[str]:
        return list(self._entries)

    def get(self, kind: str, name: str) -> Entry:
        if kind not in self._entries:
            raise RegistryError(self._unknown("kind", kind, list(self._entries)))
        try:
            return self._entries[kind][name]
        except KeyError:
            raise RegistryError(self._unknown(kind, name, list(self._entries[kind]))) from None

    def names(self, kind: str) -> list[str]:
        return sorted(self.get_kind(kind))

    def get_kind(self, kind: str) -> dict[str, Entry]:
        if kind not in self._entries:
            raise RegistryError(self._unknown("kind", kind, list(self._entries)))
        return self._entries[kind]

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        for k in [kind] if kind else self._entries:
            for name in sorted(self.get_kind(k)):
                yield self._entries[k][name]

    @staticmethod
    def _unknown(kind: str, name: str, valid: list[str]) -> str:
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(sorted(valid)) if valid else "(none registered)"
        return f"unknown {kind} '{name}'{hint} Valid: {listing}"

    # ------------------------------------------------------------------ building
    def config(self, kind: str, spec: Mapping[str, Any] | str, *, where: str = "") -> BaseModel:
        """Validate a spec into its config model (``type`` names the component)."""
        name, fields = split_spec(kind, spec, where=where)
        entry = self.get(kind, name)
        try:
            return entry.config.model_validate(fields)
        except ValidationError as e:
            raise RegistryError(_format_validation(kind, name, e, where)) from None

    def build(
        self,
        kind: str,
        spec: Mapping[str, Any] | str,
        *,
        data: Any = None,
        components: Mapping[str, Any] | None = None,
        where: str = "",
    ) -> Any:
        """Build a component from ``{"type": NAME, **fields}`` (or just ``NAME``)."""
        name, _ = split_spec(kind, spec, where=where)
        entry = self.get(kind, name)
        cfg = self.config(kind, spec, where=where)
        obj = (
            entry.factory(cfg, ctx=BuildContext(self, data, components or {}))
            if entry.wants_context
            else entry.factory(cfg)
        )
        try:  # remember how it was built, so a composition can be saved and rebuilt
            obj.genzoo_spec = {"type": name, **cfg.model_dump(mode="json")}
        except AttributeError:
            pass
        return obj


def split_spec(kind: str, spec: Mapping[str, Any] | str, *, where: str = "") -> tuple[str, Any]:
    """``"ddim"`` or ``{"type": "ddim", "eta": 0}`` -> (``"ddim"``, ``{"eta": 0}``)."""
    if isinstance(spec, str):
        return spec, {}
    if not isinstance(spec, Mapping):
        raise RegistryError(f"{where}{kind} spec must be a mapping with a 'type' field, got {type(spec).__name__}")
    if "type" not in spec:
        raise RegistryError(
            f"{where}{kind} spec {dict(spec)!r} has no 'type' field; add `type: NAME` (see `genzoo list --kind {kind}`)"
        )
    fields = {k: v for k, v in spec.items() if k != "type"}
    return str(spec["type"]), fields


@dataclass
class PluginRegistrar:
    """What a plugin's hook receives: registers with the plugin's name, all or nothing (but for names already taken)."""

    registry: Registry
    plugin: str
    _pending: list[tuple[str, str, dict[str, Any]]] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # one sentence per component refused because its name was taken

    def register(
        self, kind: str, name: str, *, config: type[BaseModel], factory: Callable[..., Any], summary: str | None = None
    ) -> None:
        self._pending.append((kind, name, dict(config=config, factory=factory, summary=summary)))

    def register_module(self, *modules: Any) -> None:
        """Register every component marked with :func:`component` in ``modules``, in order."""
        for module in modules:
            for kind, name, config, factory in marked(module):
                self.register(kind, name, config=config, factory=factory)

    def commit(self) -> list[tuple[str, str]]:
        """Register everything pending; on any error register nothing and raise.

        A name another plugin registered first is not an error of this plugin's: that one component is refused
        (reported in ``refused``) and the rest are registered, so a plugin loaded later never knocks out an earlier
        one (built-in plugins load first) and loses only what collides.
        """
        done: list[tuple[str, str]] = []
        try:
            for kind, name, kw in self._pending:
                owner = self.registry._entries.get(kind, {}).get(name)
                if owner is not None and owner.plugin != self.plugin:
                    self.refused.append(
                        f"{kind} '{name}' is registered by both plugin '{owner.plugin}' and plugin '{self.plugin}'; "
                        f"the one from '{self.plugin}' is refused (rename it, or disable a plugin with "
                        f"GENZOO_DISABLE_PLUGINS={self.plugin})"
                    )
                    continue
                self.registry.register(kind, name, plugin=self.plugin, **kw)
                done.append((kind, name))
        except Exception:
            for kind, name in done:
                del self.registry._entries[kind][name]
            self.refused.clear()
            raise
        return done

    def __getattr__(self, item: str) -> Any:  # read-only lookups go to the registry
        return getattr(self.registry, item)
