"""The command line through a real subprocess: listing, recipes, errors, train -> sample -> resume."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import run_genzoo, write_recipes

genzoo = functools.partial(run_genzoo, env={"GENZOO_STRICT_PLUGINS": "1"})


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    return write_recipes(tmp_path_factory.mktemp("recipes") / "tiny.yaml", "tiny-ddpm", "tiny-adm")


def test_list_shows_every_kind_with_its_plugin() -> None:
    r = genzoo("list", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["components"]
    by = {(c["kind"], c["name"]): c["plugin"] for c in rows}
    assert by[("sampler", "ddim")] == "diffusion"
    assert by[("dataset", "shapes")] == "data"
    assert by[("prior", "gaussian")] == "core"
    assert {"encoder", "prior", "decoder", "sampler", "guidance", "dataset", "metric"} <= set(
        json.loads(r.stdout)["kinds"]
    )


def test_info_resolved_fills_nested_defaults(recipes: Path) -> None:
    r = genzoo("info", "tiny-ddpm", "--recipes", str(recipes), "--resolved", "--sampler", "ddim", "--steps", "10")
    assert r.returncode == 0, r.stderr
    resolved = json.loads(r.stdout)
    assert resolved["components"]["sampler"] == {**resolved["components"]["sampler"], "type": "ddim", "steps": 10}
    unet = resolved["components"]["decoder"]["denoiser"]
    assert unet["type"] == "unet" and unet["model_channels"] == 16 and "dropout" in unet  # default filled in


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "ddpm-digts"], "unknown recipe 'ddpm-digts'; did you mean 'ddpm-digits'?"),
        (["info", "ddpm-digits", "--resolved", "--sampler", "ddimm"], "did you mean 'ddim'?"),
        (["info", "ddpm-digits", "--resolved", "--set", "decoder.schedul=cosine"], "field 'schedul': unknown field"),
        (["sample", "/nonexistent/run"], "/nonexistent/run"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(args: list[str], message: str) -> None:
    r = genzoo(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_debug_shows_traceback() -> None:
    r = genzoo("--debug", "info", "ddpm-digts")
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_train_sample_resume(recipes: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    r = genzoo("train", "tiny-ddpm", "--recipes", str(recipes), "--out", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert (run / "latest").read_text().strip() == "step-00000004"
    assert len((run / "metrics.jsonl").read_text().splitlines()) >= 4

    # fp32; the same draw under bf16 autocast, and with the U-Net compiled: close to fp32, bf16 not bitwise
    draws = {}
    for name, flags in (("x", []), ("bf16", ["--precision", "bf16"]), ("compiled", ["--compile"])):
        r = genzoo(
            *("sample", str(run), "-n", "3", "--sampler", "ddim", "--steps", "5", "--device", "cpu", *flags),
            *("--out", str(tmp_path / f"{name}.png"), "--save", str(tmp_path / f"{name}.safetensors")),
        )
        assert r.returncode == 0, r.stderr
        draws[name] = load_file(tmp_path / f"{name}.safetensors")["samples"]
    x, bf16, compiled = draws["x"], draws["bf16"], draws["compiled"]
    assert tuple(x.shape) == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert (tmp_path / "x.png").stat().st_size > 0
    assert 0 < (bf16 - x).abs().max() < 0.25
    assert (compiled - x).abs().max() < 1e-3

    r = genzoo("sample", str(run), "--prompt", "a red circle", "--out", str(tmp_path / "p.png"))
    assert r.returncode == 2 and "has no text encoder, so it cannot take a prompt" in r.stderr

    r = genzoo("sample", str(run), "--guidance", "classifier", "--class", "3", "--out", str(tmp_path / "c.png"))
    assert r.returncode == 2 and "has no weights for guidance 'classifier', which needs training" in r.stderr

    r = genzoo(
        "train", "tiny-ddpm", "--recipes", str(recipes), "--out", str(run), "--steps", "6", "--resume", "--no-progress"
    )
    assert r.returncode == 0, r.stderr
    assert "to step 6" in r.stdout


def test_issue_command_classifier_guided_ddim(recipes: Path, tmp_path: Path) -> None:
    """`genzoo sample DIR --sampler ddim --steps 50 --guidance classifier --scale 2` on an ADM-shaped run."""
    run = tmp_path / "adm"
    r = genzoo("train", "tiny-adm", "--recipes", str(recipes), "--out", str(run), "--no-progress")
    assert r.returncode == 0, r.stderr
    stages = [json.loads(line)["stage"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert stages == ["decoder", "decoder", "guidance", "guidance"]
    r = genzoo(
        *("sample", str(run), "--sampler", "ddim", "--steps", "50", "--guidance", "classifier", "--scale", "2"),
        *("--class", "3", "-n", "2", "--out", str(tmp_path / "g.png"), "--save", str(tmp_path / "x.safetensors")),
    )
    assert r.returncode == 0, r.stderr
    assert tuple(load_file(tmp_path / "x.safetensors")["samples"].shape) == (2, 1, 8, 8)
