"""The layout rules of docs/architecture.md, read from the source: what may import what, and where
a component's summary comes from."""

from __future__ import annotations

import ast
import itertools
import re
from pathlib import Path

import pytest
import torch

from genzoo.plugins import default_registry
from genzoo.registry import own_doc

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").iterdir() if (p / "__init__.py").exists())


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module, imported names, line) of every absolute import in ``path``; relative imports are the package's own."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def test_the_framework_never_imports_a_plugin() -> None:
    plugin_names = {p.name for p in PLUGINS}
    bad = [
        f"{f.relative_to(ROOT)}:{line} imports {mod}"
        for f in (ROOT / "genzoo").rglob("*.py")
        for mod, _, line in imports(f)
        if mod.split(".")[0] in plugin_names or mod.startswith("genzoo_")
    ]
    assert not bad, bad


@pytest.mark.parametrize("plugin", PLUGINS, ids=lambda p: p.name)
def test_a_plugin_imports_no_other_plugin_and_only_public_genzoo_names(plugin: Path) -> None:
    bad = []
    for f in plugin.rglob("*.py"):
        for mod, names, line in imports(f):
            where = f"{f.relative_to(ROOT)}:{line}"
            top = mod.split(".")[0]
            if top.startswith("genzoo_") and top != plugin.name:
                bad.append(f"{where} imports another plugin, {mod}")
            if top == "genzoo" and (
                any(part.startswith("_") for part in mod.split(".")[1:]) or any(n.startswith("_") for n in names)
            ):
                bad.append(f"{where} imports a private name: from {mod} import {', '.join(names)}")
    assert not bad, bad


def test_the_rules_catch_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "m.py"
    f.write_text("from genzoo.priors import _Hidden\nimport genzoo_gan.gan\nfrom . import sibling\n")
    assert imports(f) == [("genzoo.priors", ["_Hidden"], 1), ("genzoo_gan.gan", [], 2)]


def test_every_summary_is_a_genzoo_docstring_never_a_library_one() -> None:
    """A summary is the first paragraph of the factory's or the config's own docstring, written in genzoo or
    the plugin that registers it (pydantic's BaseModel and torch's Module docstrings used to leak in)."""
    for e in default_registry().entries():
        assert e.summary, f"{e.kind} '{e.name}' has no summary: give its factory or config a docstring"
        sources = [
            o
            for o in (e.factory, e.config)
            if own_doc(o) and e.summary == own_doc(o).split("\n\n")[0].replace("\n", " ")
        ]
        if not sources:  # an explicit summary= at registration
            continue
        module = getattr(sources[0], "__module__", "")
        assert module.split(".")[0].startswith("genzoo"), f"{e.kind} '{e.name}': summary from {module}"
        assert "Usage Documentation" not in e.summary and "Base class" not in e.summary


def test_own_doc_ignores_inherited_docstrings() -> None:
    from pydantic import BaseModel

    class Bare(BaseModel):
        pass

    class Told(BaseModel):
        """Mine."""

    assert own_doc(Bare) == "" and own_doc(Told) == "Mine."


def nested_templates(text: str) -> list[str]:
    """Templates of a recipe file that merge another template and are themselves used by a recipe."""
    lines, bad = text.splitlines(), []
    for i, line in enumerate(lines):
        anchor = re.search(r"&([\w-]+)", line)
        if not anchor:
            continue
        indent = len(line) - len(line.lstrip())
        block = [line] + list(
            itertools.takewhile(lambda s, d=indent: not s.strip() or len(s) - len(s.lstrip()) > d, lines[i + 1 :])
        )
        if any("<<: *" in b for b in block) and f"*{anchor.group(1)}" in text:
            bad.append(anchor.group(1))
    return bad


def test_recipe_templates_are_one_level_deep() -> None:
    assert nested_templates((ROOT / "registry.yaml").read_text()) == []
    assert nested_templates("t:\n  a: &a {x: 1}\n  b: &b\n    n: {<<: *a, y: 2}\nr: {<<: *b}\n") == ["b"]


def test_the_package_exports_a_one_call_api() -> None:
    import genzoo

    model = genzoo.create_model("ddpm-digits")
    again = genzoo.create_model(genzoo.resolve_recipe("ddpm-digits"))
    # drawn from the recipe's seed: the same weights twice, whatever the process's RNG did in between
    torch.rand(3)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name
    assert "ddpm-digits" in genzoo.list_recipes() and callable(genzoo.load_model)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        genzoo.nope  # noqa: B018
