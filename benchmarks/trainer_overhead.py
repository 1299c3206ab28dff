"""Trainer overhead: steps/s of a tiny model through genzoo's Trainer against a bare loop, same run.

python benchmarks/trainer_overhead.py [--steps 400]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch
from torch import nn

from genzoo.interfaces import Pipeline
from genzoo.training import TrainConfig, Trainer


class Tiny(Pipeline):
    def __init__(self, width: int = 128) -> None:
        super().__init__({"decoder": nn.Sequential(nn.Linear(64, width), nn.SiLU(), nn.Linear(width, 64))})

    def training_losses(self, batch, *, optimizer="main", stage="main"):
        x = batch["image"].flatten(1)
        return {"loss": (self.components["decoder"](x + torch.randn_like(x)) - x).pow(2).mean()}


def bare(data: torch.Tensor, steps: int, batch: int, width: int) -> float:
    torch.manual_seed(0)
    model = Tiny(width)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    perm, pos = torch.randperm(len(data), generator=g), 0
    t0 = time.perf_counter()
    for _ in range(steps):
        if pos + batch > len(data):
            perm, pos = torch.randperm(len(data), generator=g), 0
        x = data[perm[pos : pos + batch]]
        pos += batch
        loss = model.training_losses({"image": x})["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - t0)


def through_trainer(data: torch.Tensor, steps: int, batch: int, width: int) -> float:
    torch.manual_seed(0)
    cfg = TrainConfig(
        steps=steps,
        batch_size=batch,
        lr=1e-3,
        ema_decay=0.999,
        grad_clip=1.0,
        log_every=50,
        checkpoint_every=10**9,
        device="cpu",
    )
    with tempfile.TemporaryDirectory() as d:
        result = Trainer(
            Tiny(width), {"image": data}, config=cfg, run_dir=d, recipe={"name": "bench"}, progress=False
        ).fit()
    return result.steps_per_sec


def measure(steps: int = 400, batch: int = 64) -> dict:
    data = torch.randn(4096, 1, 8, 8)
    out = {}
    for width in (128, 4096):  # a ~1 ms step, where fixed costs show, and a ~10x heavier one
        bare(data, 20, batch, width)  # warm up
        b = bare(data, steps, batch, width)
        t = through_trainer(data, steps, batch, width)
        out[f"width_{width}"] = {"bare_steps_per_s": b, "trainer_steps_per_s": t, "trainer_over_bare": t / b}
    out["note"] = "trainer: EMA, grad clipping, NaN check, JSONL every 50 steps, one final checkpoint; batch 64"
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=400)
    print(json.dumps(measure(p.parse_args().steps), indent=2))
