"""The shipped diffusion recipes train through the trainer, reload from their checkpoint and sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import fit

from genzoo import api

TINY = [
    "decoder.denoiser.model_channels=16",
    "decoder.denoiser.num_res_blocks=1",
    "train.batch_size=16",
    "train.log_every=1",
    "train.checkpoint_every=100",
]


@pytest.mark.parametrize(
    "name, sets, stages",
    [
        ("ddpm-digits", ["train.steps=3"], ["decoder"]),
        ("iddpm-digits", ["train.steps=3"], ["decoder"]),
        ("cfg-digits", ["train.steps=3"], ["decoder"]),
        (
            "adm-digits",
            ["train.stages={decoder: 2, guidance: 3}", "guidance.classifier.model_channels=16"],
            ["decoder", "guidance"],
        ),
    ],
)
def test_recipe_trains_reloads_and_samples(tmp_path: Path, name: str, sets: list[str], stages: list[str]) -> None:
    resolved = api.resolve_recipe(name, sets=TINY + sets)
    source = api.build_data(resolved)
    torch.manual_seed(0)
    result = fit(api.create_model(resolved, data_spec=source.spec), source, resolved, tmp_path)
    rows = [json.loads(r) for r in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [
        s for s in stages for _ in range(2 if s == "decoder" and len(stages) > 1 else 3)
    ]
    if "iddpm" in name:
        assert all("vlb" in r and r["loss"] > r["mse"] for r in rows)  # L_hybrid
    if name.startswith("adm"):
        assert "accuracy" in rows[-1]  # the noisy classifier's stage
    model = api.load_model(tmp_path, sampler="ddim", steps=4)
    cond = {"y": torch.tensor([1, 7])} if resolved["pipeline"]["condition"] == "class" else None
    x = model.sample(2, cond, generator=torch.Generator().manual_seed(0))
    assert x.shape == (2, 1, 8, 8) and torch.isfinite(x).all() and x.abs().max() <= 1 + 1e-5
    assert result.checkpoint.name == f"step-{result.step:08d}"
