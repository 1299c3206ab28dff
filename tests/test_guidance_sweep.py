"""``genzoo compare RUN@GUIDANCE:S1,S2,...``: one parser for sampler and guidance variants; a sweep of the guidance
scale gives one leaderboard row per scale and a plot of FD, precision, recall and accuracy against the scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import threads, write_recipes

from genzoo.errors import GenzooError
from genzoo.eval.compare import Entry, compare, parse_sweep
from genzoo.eval.evaluate import EvalSettings
from genzoo.plugins import default_registry


def test_entries_name_a_sampler_with_steps_or_a_guidance_with_scales() -> None:
    reg = default_registry()
    (e,) = Entry.expand("ddpm-shapes@ddim:25", reg)
    assert (e.text, e.recipe, e.swaps, e.sweep) == (
        "ddpm-shapes@ddim:25",
        "ddpm-shapes",
        {"sampler": "ddim", "steps": 25},
        None,
    )
    (e,) = Entry.expand("adm-digits@classifier:2", reg)  # one value: a row, not a sweep
    assert e.swaps == {"guidance": "classifier", "scale": 2.0} and e.sweep is None
    es = Entry.expand("adm-digits@classifier:0,1,2.5", reg)
    assert [e.text for e in es] == ["adm-digits@classifier:0", "adm-digits@classifier:1", "adm-digits@classifier:2.5"]
    assert [e.scale for e in es] == [0.0, 1.0, 2.5] and {e.sweep for e in es} == {("adm-digits@classifier", "scale")}
    es = Entry.expand("runs/glide@ddpm:25@cfg:1,3", reg)  # a run directory, its sampler fixed, the scale swept
    assert [e.swaps for e in es] == [
        {"sampler": "ddpm", "steps": 25, "guidance": "cfg", "scale": s} for s in (1.0, 3.0)
    ]
    assert es[1].text == "runs/glide@ddpm:25@cfg:3" and es[1].sweep == ("runs/glide@ddpm:25@cfg", "scale")
    es = Entry.expand("ddpm-shapes@ddim:10,50", reg)  # steps sweep the same way
    assert [e.steps for e in es] == [10, 50] and es[0].sweep == ("ddpm-shapes@ddim", "steps")
    assert Entry.expand("adm-digits@none", reg)[0].swaps == {"guidance": "none"}
    with pytest.raises(GenzooError, match="'bogus' is neither a sampler .* nor a guidance .*cfg"):
        Entry.expand("adm-digits@bogus:1", reg)
    with pytest.raises(GenzooError, match="'high' is not a number; expected guidance scales"):
        Entry.expand("adm-digits@cfg:1,high", reg)
    assert parse_sweep("ddim:10,25") == ("ddim", [10, 25])  # --sweep goes through the same parser
    with pytest.raises(GenzooError, match="'--sweep ddim:10,2.5': '2.5' is not a number; expected integer sampler"):
        parse_sweep("ddim:10,2.5")


def test_compare_sweeps_the_guidance_scale_into_rows_and_a_plot(tmp_path: Path, cheap_judges) -> None:
    with threads(1):  # a few hundred steps of an 8x8 U-Net: a second thread's wake-up costs more than it saves
        _sweep(tmp_path)


def _sweep(tmp_path: Path) -> None:
    recipes = write_recipes(tmp_path / "tiny.yaml", "tiny-adm", "tiny-cfg")
    out = tmp_path / "cmp"
    rows = compare(
        ["tiny-adm@ddpm:20@none", "tiny-adm@ddpm:20@classifier:0,8", "tiny-cfg@cfg:0,1,4", "tiny-cfg@nope:1"],
        out=out,
        settings=EvalSettings(samples=40, batch_size=40),
        metric_names=["fd", "precision-recall", "attribute-accuracy"],
        files=[recipes],
        segments=1,
        log=lambda m: None,
    )
    by = {r.name: r for r in rows}
    assert set(by) == {
        "tiny-adm@ddpm:20@none",
        "tiny-adm@ddpm:20@classifier:0",
        "tiny-adm@ddpm:20@classifier:8",
        "tiny-cfg@cfg:0",
        "tiny-cfg@cfg:1",
        "tiny-cfg@cfg:4",
        "tiny-cfg@nope:1",
    }
    assert "neither a sampler" in by["tiny-cfg@nope:1"].error
    ok = [r for r in rows if not r.error]
    assert all({"fd", "precision", "recall", "label_accuracy"} <= set(r.figures) for r in ok)
    # classifier guidance at scale 0 is no guidance: the same sample stream, the same figures; the scale is applied
    assert by["tiny-adm@ddpm:20@classifier:0"].figures == by["tiny-adm@ddpm:20@none"].figures
    assert by["tiny-adm@ddpm:20@classifier:8"].figures["fd"] != by["tiny-adm@ddpm:20@classifier:0"].figures["fd"]
    assert len({by[f"tiny-cfg@cfg:{s}"].figures["fd"] for s in (0, 1, 4)}) == 3
    assert sorted(p.name for p in (out / "runs").iterdir()) == ["tiny-adm", "tiny-cfg"]  # each trained once
    sweeps = json.loads((out / "curves.json").read_text())["sweeps"]
    assert set(sweeps) == {"tiny-adm@ddpm:20@classifier", "tiny-cfg@cfg"}
    assert [p[0] for p in sweeps["tiny-cfg@cfg"]["points"]] == [0.0, 1.0, 4.0]
    assert sweeps["tiny-cfg@cfg"]["points"][2][1]["fd"] == by["tiny-cfg@cfg:4"].figures["fd"]
    for f in ("sweep_tiny-adm_ddpm-20_classifier.png", "sweep_tiny-cfg_cfg.png", "grids/tiny-cfg_cfg-4.png"):
        assert (out / f).stat().st_size > 0, f
    board = (out / "leaderboard.md").read_text()
    assert "label_accuracy" in board.splitlines()[2] and "| tiny-cfg@cfg:4 |" in board
