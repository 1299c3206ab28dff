"""The command line through a real subprocess: listing, recipes, errors, train -> sample -> resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

TINY = """
recipes:
  tiny-ddpm:
    description: a DDPM small enough to train in seconds on CPU
    pipeline: {type: diffusion}
    data: {type: digits, image_size: 8}
    components:
      prior: {type: gaussian}
      decoder:
        type: diffusion-decoder
        timesteps: 100
        denoiser: {type: unet, model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [4]}
      sampler: {type: ddpm, steps: 100}
    train: {steps: 4, batch_size: 8, lr: 1.0e-3, checkpoint_every: 2, log_every: 1, sample_every: 0}
    sample: {n: 4}
  tiny-adm:
    description: ADM-shaped, small enough to train in seconds on CPU
    pipeline: {type: diffusion, condition: class}
    data: {type: digits, image_size: 8}
    components:
      prior: {type: gaussian}
      decoder:
        type: diffusion-decoder
        timesteps: 100
        var_type: learned-range
        loss: hybrid
        denoiser: {type: unet, model_channels: 16, channel_mult: [1, 2], num_res_blocks: 1, attention_resolutions: [4],
                   num_classes: 10}
      sampler: {type: ddpm, steps: 100}
      guidance: {type: classifier, scale: 1.0,
                 classifier: {type: noisy-classifier, model_channels: 16, channel_mult: [1, 2]}}
    train: {stages: {decoder: 2, guidance: 2}, batch_size: 8, log_every: 1}
"""


def genzoo(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GENZOO_STRICT_PLUGINS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "genzoo", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300
    )


@pytest.fixture(scope="module")
def recipes(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("recipes") / "tiny.yaml"
    p.write_text(TINY)
    return p


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

    r = genzoo(
        "sample",
        str(run),
        "-n",
        "3",
        "--sampler",
        "ddim",
        "--steps",
        "5",
        "--out",
        str(tmp_path / "g.png"),
        "--save",
        str(tmp_path / "x.safetensors"),
        "--device",
        "cpu",
    )
    assert r.returncode == 0, r.stderr
    x = load_file(tmp_path / "x.safetensors")["samples"]
    assert tuple(x.shape) == (3, 1, 8, 8) and x.min() >= -1 and x.max() <= 1
    assert (tmp_path / "g.png").stat().st_size > 0
    # the same draw under bf16 autocast, and with the U-Net compiled: close to fp32, bf16 not bitwise
    for flags, name in ((["--precision", "bf16"], "bf16"), (["--compile"], "compiled")):
        r = genzoo(
            "sample",
            str(run),
            "-n",
            "3",
            "--sampler",
            "ddim",
            "--steps",
            "5",
            "--out",
            str(tmp_path / f"{name}.png"),
            "--save",
            str(tmp_path / f"{name}.safetensors"),
            "--device",
            "cpu",
            *flags,
        )
        assert r.returncode == 0, r.stderr
    bf16, compiled = (load_file(tmp_path / f"{n}.safetensors")["samples"] for n in ("bf16", "compiled"))
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
        "sample",
        str(run),
        "--sampler",
        "ddim",
        "--steps",
        "50",
        "--guidance",
        "classifier",
        "--scale",
        "2",
        "--class",
        "3",
        "-n",
        "2",
        "--out",
        str(tmp_path / "g.png"),
        "--save",
        str(tmp_path / "x.safetensors"),
    )
    assert r.returncode == 0, r.stderr
    assert tuple(load_file(tmp_path / "x.safetensors")["samples"].shape) == (2, 1, 8, 8)
