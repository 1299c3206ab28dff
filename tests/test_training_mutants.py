"""Tests that catch wrong code in genzoo/training (issue 21 item 5, `make mutation`): the trainer's bookkeeping
against what a run must do, step by step, and the EMA, image and torchrun helpers against closed forms.

Each run is a one- or two-weight pipeline whose gradient is known, trained for a handful of steps with a recording
logger, so the data order (a seeded permutation, the remainder dropped), the seeding of every RNG, the EMA of the
weights, gradient clipping, the per-optimiser settings, the logs, sample grids, checkpoints, stage changes and the
run's result can each be checked exactly. The file runs in a few seconds on one thread.
"""

from __future__ import annotations

import io
import math
import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict
from tiny import RecordingLogger
from torch import nn

from genzoo.checkpoint import load_checkpoint
from genzoo.errors import GenzooError, TrainingError
from genzoo.interfaces import Pipeline
from genzoo.registry import Registry
from genzoo.training import OptimizerConfig, TrainConfig, Trainer, distributed, lr_factor, resolve_device
from genzoo.training.ema import EMA
from genzoo.training.images import grid_image, load_image, save_grid, save_png, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = {"name": "toy", "pipeline": {"type": "toy"}, "data": {"type": "toy"}, "components": {}}


class RecordConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")


@pytest.fixture
def events() -> list:
    return []


@pytest.fixture
def registry(events) -> Registry:
    reg = Registry()
    reg.register("logger", "record", config=RecordConfig, factory=lambda cfg: RecordingLogger(events))
    return reg


def data(n: int = 10) -> dict:
    """Image i is the number i; labels and captions name it too."""
    return {
        "image": torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1),
        "label": torch.arange(n),
        "caption": [f"c{i}" for i in range(n)],
    }


def cfg(**kw) -> TrainConfig:
    base = dict(
        steps=5,
        batch_size=4,
        lr=0.1,
        warmup_steps=0,
        ema_decay=None,
        grad_clip=None,
        checkpoint_every=100,
        log_every=1,
        device="cpu",
        loggers=["record"],
        channels_last=False,
    )
    return TrainConfig(**{**base, **kw})


class Line(Pipeline):
    """loss = sum(w * c) (gradient c), plus draws from every global RNG, recorded with each batch and the weight the
    step saw."""

    stages = ("main",)

    def __init__(self, c=(3.0, 4.0)) -> None:
        super().__init__({"decoder": nn.Linear(len(c), 1, bias=False)})
        nn.init.zeros_(self.components["decoder"].weight)
        self.c = torch.tensor(c)
        self.batches, self.draws, self.seen, self.sampled, self.fitted, self.begun = [], [], [], [], [], []

    @property
    def w(self) -> torch.Tensor:
        return self.components["decoder"].weight

    def training_losses(self, batch, *, optimizer="main", stage="main"):
        self.batches.append(batch)
        self.draws.append((torch.rand(1).item(), random.random(), float(np.random.rand())))
        self.seen.append(self.w.detach().clone())
        return {"loss": (self.w * self.c).sum(), "size": torch.tensor(float(len(batch["image"])))}

    def sample(self, n, condition=None, *, generator=None):
        self.sampled.append((n, generator.initial_seed(), self.training, self.w.detach().clone(), torch.rand(1)))
        return torch.zeros(n, 1, 2, 2)

    def begin_stage(self, stage, data) -> None:
        self.begun.append(stage)

    def fit_after_training(self, data) -> None:
        self.fitted.append(self.w.detach().clone())
        self.fit_data = data


def trainer(pipeline, run: Path, config: TrainConfig, registry, n: int = 10, **kw) -> Trainer:
    return Trainer(
        pipeline, data(n), config=config, run_dir=run, recipe=RECIPE, progress=False, registry=registry, **kw
    )


# ------------------------------------------------------------------ devices and the learning-rate schedule


def test_resolve_device() -> None:
    assert resolve_device() == torch.device("cpu") and resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu") and resolve_device("meta") == torch.device("meta")
    for name in ("cuda", "cuda:1"):
        message = rf"^device '{name}' was asked for but CUDA is not available; use --device cpu or auto$"
        with pytest.raises(TrainingError, match=message):
            resolve_device(name)
    with pytest.raises(TrainingError, match=r"^unknown device 'tpu9'; use auto, cpu, cuda or cuda:N$"):
        resolve_device("tpu9")


def test_lr_factor_is_linear_warmup_then_cosine_to_the_floor() -> None:
    def f(step, warmup=4, total=10, schedule="cosine", min_ratio=0.2):
        return lr_factor(step, warmup=warmup, total=total, schedule=schedule, min_ratio=min_ratio)

    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for s in range(4, 14):
        progress = min(1.0, (s - 4) / 6)
        assert f(s) == pytest.approx(0.2 + 0.8 * 0.5 * (1 + math.cos(math.pi * progress)), rel=1e-15, abs=1e-15), s
    assert f(4) == 1.0 and f(10) == pytest.approx(0.2, rel=1e-15) and f(13) == pytest.approx(0.2, rel=1e-15)
    assert f(7) == pytest.approx(0.6, rel=1e-15)
    assert [f(s, schedule="constant") for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert f(0, warmup=0) == 1.0 and f(5, warmup=0) == pytest.approx(0.2 + 0.4 * (1 + math.cos(math.pi / 2)))
    assert f(5, warmup=5, total=5) == 1.0 and f(6, warmup=5, total=3) == 1.0  # nothing left to decay over
    assert f(1, warmup=0, total=1) == pytest.approx(0.2) and f(0, warmup=0, total=0) == 1.0


# ------------------------------------------------------------------ data, seeding, logging


def test_batches_follow_the_seeded_permutation_and_drop_the_remainder(tmp_path, registry) -> None:
    for n, steps in ((10, 5), (12, 4)):
        p = Line()
        trainer(p, tmp_path / f"n{n}", cfg(steps=steps, seed=3), registry, n=n).fit()
        g, want = torch.Generator().manual_seed(3), []
        while len(want) < steps:
            perm = torch.randperm(n, generator=g)
            want += [perm[i : i + 4] for i in range(0, n - 3, 4)]
        for batch, idx in zip(p.batches, want):
            assert batch["image"].flatten().long().tolist() == idx.tolist()
            assert torch.equal(batch["label"], idx) and batch["caption"] == [f"c{i}" for i in idx.tolist()]
        assert len(p.batches) == steps


def test_every_rng_is_seeded_by_the_run_seed(tmp_path, registry) -> None:
    p = Line()
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    trainer(p, tmp_path, cfg(steps=1, seed=5), registry).fit()
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    assert p.draws[0] == (torch.rand(1).item(), random.random(), float(np.random.rand()))


def test_the_loggers_get_each_step_and_the_run_info(tmp_path, registry, events) -> None:
    p = Line()
    t = trainer(p, tmp_path / "run", cfg(steps=5, log_every=2, lr=0.5, warmup_steps=2), registry)
    assert events == []  # built with the trainer, started by fit
    r = t.fit()
    (kind, run), *logged, finish = events
    assert kind == "start" and run.run_dir == tmp_path / "run" and run.name == "toy" and run.phase == "train"
    assert run.config == RECIPE and run.step == 0 and finish == ("finish", "success")
    assert [e[2] for e in logged] == [2, 4]
    for _, record, step in logged:
        assert set(record) == {"stage", "loss", "size", "lr/main", "it_s", "time"} and record["stage"] == "main"
        assert record["lr/main"] == pytest.approx(
            0.5 * lr_factor(step, warmup=2, total=5, schedule="cosine", min_ratio=0.1)
        )
        assert record["size"] == 4.0 and record["it_s"] > 0 and record["time"] > 0
    assert logged[1][1]["it_s"] == pytest.approx(4 / logged[1][1]["time"], rel=1e-9)
    assert r.step == 5 and r.losses == {"loss": pytest.approx(float((p.seen[-1] * p.c).sum())), "size": 4.0}
    events.clear()
    unnamed = {**RECIPE, "name": None}
    Trainer(
        Line(), data(), config=cfg(steps=1), run_dir=tmp_path / "r2", recipe=unnamed, progress=False, registry=registry
    ).fit()
    assert events[0][1].name == "r2"
    events.clear()
    trainer(Line(), tmp_path / "r2", cfg(steps=2), registry).fit(resume=True)
    assert events[0][1].phase == "resume" and events[0][1].step == 1 and [e[2] for e in events[1:-1]] == [2]


def test_a_failing_run_finishes_its_loggers_as_failed(tmp_path, registry, events) -> None:
    class Fails(Line):
        def training_losses(self, batch, **kw):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        trainer(Fails(), tmp_path, cfg(), registry).fit()
    assert events[-1] == ("finish", "failed")


# ------------------------------------------------------------------ the optimiser step


def test_grad_clip_clips_the_global_norm_and_logs_it_before_clipping(tmp_path, registry, events) -> None:
    p = Line(c=(3.0, 4.0))  # |grad| = 5
    trainer(p, tmp_path / "clip", cfg(steps=2, grad_clip=2.0), registry).fit()
    assert [e[1]["grad_norm"] for e in events if e[0] == "metrics"] == [5.0, 5.0]
    torch.testing.assert_close(p.w.grad, torch.tensor([[1.2, 1.6]]))  # c * 2 / 5
    events.clear()
    p = Line(c=(0.3, 0.4))
    trainer(p, tmp_path / "under", cfg(steps=1, grad_clip=2.0), registry).fit()
    torch.testing.assert_close(p.w.grad, torch.tensor([[0.3, 0.4]]))
    assert events[1][1]["grad_norm"] == pytest.approx(0.5)
    events.clear()
    p = Line()
    trainer(p, tmp_path / "off", cfg(steps=1), registry).fit()
    assert "grad_norm" not in events[1][1] and torch.equal(p.w.grad, torch.tensor([[3.0, 4.0]]))


def test_the_first_adam_step_moves_each_weight_by_lr(tmp_path, registry) -> None:
    """Adam's first step is lr * g / (|g| + eps) per weight (bias-corrected), decoupled decay lr * wd * w before it."""
    p = Line(c=(3.0, -4.0))
    trainer(p, tmp_path, cfg(steps=2, lr=0.1, weight_decay=0.5), registry).fit()
    torch.testing.assert_close(p.seen[1], torch.tensor([[-0.1, 0.1]]), rtol=0, atol=1e-6)


class Two(Pipeline):
    """A generator g and a discriminator d (one weight each, gradients 1 and 2), a pretraining stage for g."""

    stages = ("pre", "game")

    def __init__(self, declared=None) -> None:
        super().__init__({"g": nn.Linear(1, 1, bias=False), "d": nn.Linear(1, 1, bias=False)})
        if declared is not None:
            self.ddp_find_unused_parameters = declared
        self.calls, self.begun = [], []

    def optimizer_groups(self, stage="pre"):
        g, d = list(self.components["g"].parameters()), list(self.components["d"].parameters())
        if stage == "all":  # one optimiser for everything
            return {"main": g + d}
        return {"main": g} if stage == "pre" else {"discriminator": d, "generator": g}

    def training_losses(self, batch, *, optimizer="main", stage="pre"):
        self.calls.append((stage, optimizer))
        g, d = self.components["g"].weight.sum(), self.components["d"].weight.sum()
        return {"loss": g if optimizer != "discriminator" else 2 * d, "gap": (g - d).detach()}

    def begin_stage(self, stage, data) -> None:
        self.begun.append(stage)

    def sample(self, n, condition=None, *, generator=None):
        return torch.zeros(n, 1, 1, 1)


def test_several_optimisers_take_their_settings_ratio_and_names(tmp_path, registry, events) -> None:
    config = cfg(
        stages={"pre": 2, "game": 3},
        optimizer_ratio={"discriminator": 2},
        optimizers={"discriminator": OptimizerConfig(lr=0.5, betas=(0.1, 0.2), weight_decay=0.3)},
        lr=0.05,
        betas=(0.8, 0.9),
        weight_decay=0.01,
        grad_clip=10.0,
    )
    p = Two()
    r = trainer(p, tmp_path, config, registry).fit()
    assert (
        p.calls
        == [("pre", "main")] * 2 + [("game", "discriminator"), ("game", "discriminator"), ("game", "generator")] * 3
    )
    assert p.begun == ["pre", "game"]
    records = [e[1] for e in events if e[0] == "metrics"]
    assert set(records[0]) == {"stage", "loss", "gap", "grad_norm", "lr/main", "it_s", "time"}
    assert set(records[-1]) == {
        "stage",
        "discriminator/loss",
        "discriminator/gap",
        "grad_norm/discriminator",
        "generator/loss",
        "generator/gap",
        "grad_norm/generator",
        "lr/discriminator",
        "lr/generator",
        "it_s",
        "time",
    }
    assert records[-1]["grad_norm/discriminator"] == 2.0 and records[-1]["grad_norm/generator"] == 1.0
    assert [rec["stage"] for rec in records] == ["pre", "pre", "game", "game", "game"]
    state = load_checkpoint(tmp_path, with_trainer_state=True).trainer_state
    (d,) = state["optimizers"]["discriminator"]["param_groups"]
    (g,) = state["optimizers"]["generator"]["param_groups"]
    assert (d["initial_lr"], tuple(d["betas"]), d["weight_decay"]) == (0.5, (0.1, 0.2), 0.3)
    assert (g["initial_lr"], tuple(g["betas"]), g["weight_decay"]) == (0.05, (0.8, 0.9), 0.01)
    assert d["fused"] is None and g["fused"] is None
    assert state["optimizers"]["discriminator"]["state"][0]["step"] == 6  # stepped twice per global step
    assert state["schedulers"]["discriminator"]["last_epoch"] == 3 and state["stage_index"] == 1
    assert state["step"] == 5 and state["stage_step"] == 3 and r.step == 5
    zero = OptimizerConfig(weight_decay=0.0)
    p = Two()
    trainer(
        p,
        tmp_path / "wd0",
        cfg(stages={"pre": 1, "game": 1}, weight_decay=0.2, optimizers={"generator": zero}),
        registry,
    ).fit()
    groups = load_checkpoint(tmp_path / "wd0", with_trainer_state=True).trainer_state["optimizers"]
    assert groups["generator"]["param_groups"][0]["weight_decay"] == 0.0
    assert groups["discriminator"]["param_groups"][0]["weight_decay"] == 0.2


def test_each_stage_schedules_its_own_lr_over_its_own_steps(tmp_path, registry, events) -> None:
    config = cfg(stages={"pre": 3, "game": 4}, warmup_steps=1, min_lr_ratio=0.25, lr=1.0)
    trainer(Two(), tmp_path, config, registry).fit()
    records = [e[1] for e in events if e[0] == "metrics"]

    def f(s, total):
        return lr_factor(s, warmup=1, total=total, schedule="cosine", min_ratio=0.25)

    assert [r["lr/main"] for r in records[:3]] == pytest.approx([f(s, 3) for s in (1, 2, 3)])
    assert [r["lr/generator"] for r in records[3:]] == pytest.approx([f(s, 4) for s in (1, 2, 3, 4)])


def test_a_non_finite_loss_stops_before_the_ema_and_names_the_term(tmp_path, registry) -> None:
    class Nan(Line):
        def __init__(self, bad: float = float("nan")) -> None:
            super().__init__()
            self.bad = bad

        def training_losses(self, batch, **kw):
            out = super().training_losses(batch, **kw)
            return {**out, "size": out["size"] * (self.bad if len(self.batches) >= 3 else 1.0)}

    p = Nan()
    t = trainer(p, tmp_path, cfg(steps=5, checkpoint_every=2, ema_decay=0.5, grad_clip=1.0), registry)
    path = re.escape(str(tmp_path / "checkpoints" / "step-00000002"))
    message = (
        rf"^step 3 \(main/main\): loss term 'size' is nan; training stopped without saving the bad state; the last "
        rf"good checkpoint is {path}; lower train.lr \(train.grad_clip is already 1.0\)$"
    )
    with pytest.raises(TrainingError, match=message):
        t.fit()
    assert t.ema.updates == 2 and load_checkpoint(tmp_path).step == 2
    message = r"^step 3 \(main/main\): loss term 'size' is inf; training stopped without saving the bad state; lower "
    with pytest.raises(TrainingError, match=message + r"train.lr or set train.grad_clip$"):
        trainer(Nan(float("inf")), tmp_path / "inf", cfg(), registry).fit()


def test_the_ema_in_training_is_the_closed_form_average_of_the_weights_each_step_left(tmp_path, registry) -> None:
    p = Line()
    trainer(p, tmp_path, cfg(steps=6, ema_decay=0.6, lr=0.1), registry).fit()
    ck = load_checkpoint(tmp_path, with_trainer_state=True)
    raw = ck.trainer_state["model"]["decoder.weight"]
    weights = [*p.seen, raw]  # w_0 (the init) .. w_6
    shadow = weights[0]
    for n in range(6):
        d = min(0.6, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * weights[n + 1]
    torch.testing.assert_close(ck.components["decoder"]["weight"], shadow, rtol=0, atol=1e-6)
    assert ck.trainer_state["ema"]["updates"] == 6 and ck.trainer_state["ema"]["decay"] == 0.6
    assert torch.equal(p.w.detach(), raw)  # training continues on the raw weights
    torch.testing.assert_close(p.fitted[0], shadow, rtol=0, atol=1e-6)  # the fit after training sees the average


def test_a_stage_change_starts_from_the_averaged_weights_and_a_fresh_warm_up(tmp_path, registry) -> None:
    p = Two()
    t = trainer(p, tmp_path, cfg(stages={"pre": 3, "game": 1}, ema_decay=0.5), registry)
    r = t.fit()
    assert t.ema.updates == 1 and r.step == 4  # reset to 0 at the change, one game step since
    state = load_checkpoint(tmp_path, with_trainer_state=True).trainer_state
    assert state["ema"]["updates"] == 1


# ------------------------------------------------------------------ stages, saving, the result


def test_each_stage_begins_with_the_training_data_in_a_new_nested_run_folder(tmp_path, registry) -> None:
    class Begins(Two):
        def begin_stage(self, stage, data) -> None:
            self.begun.append((stage, data))

    pipeline, run = Begins(), tmp_path / "runs" / "new" / "two"
    t = trainer(pipeline, run, cfg(stages={"pre": 1, "game": 1}), registry)
    t.fit()
    assert [stage for stage, _ in pipeline.begun] == ["pre", "game"]
    assert all(data is t.data for _, data in pipeline.begun) and (run / "latest").is_file()


def test_stage_steps(tmp_path, registry) -> None:
    t = trainer(Two(), tmp_path, cfg(steps=7), registry)
    assert t._stage_steps() == [("pre", 7), ("game", 7)]
    t = trainer(Two(), tmp_path, cfg(stages={"game": 2}), registry)
    assert t._stage_steps() == [("pre", 0), ("game", 2)]
    t = trainer(Line(), tmp_path, cfg(steps=None, minutes=1.0), registry)
    assert t._stage_steps() == [("main", 10**12)]
    t = trainer(Line(), tmp_path, cfg(steps=None), registry)
    with pytest.raises(TrainingError, match=r"^train.steps is null and no --minutes budget is set; set one of them$"):
        t._stage_steps()
    t = trainer(Two(), tmp_path, cfg(stages={"game": 1, "post": 2, "eval": 1}), registry)
    message = r"^train.stages names \['eval', 'post'\], but this pipeline's stages are \['pre', 'game'\]$"
    with pytest.raises(TrainingError, match=message):
        t._stage_steps()
    plain = trainer(nn.Module(), tmp_path, cfg(steps=3), registry)
    assert plain._stage_steps() == [("main", 3)]


def test_checkpoints_every_n_steps_once_at_the_end_with_the_meta(tmp_path, registry) -> None:
    p = Line()
    r = trainer(
        p, tmp_path / "a", cfg(steps=5, checkpoint_every=2, keep_checkpoints=5, seed=7), registry, meta={"x": 1}
    ).fit()
    assert sorted(q.name for q in (tmp_path / "a" / "checkpoints").iterdir() if q.name.startswith("step")) == [
        "step-00000002",
        "step-00000004",
        "step-00000005",
    ]
    ck = load_checkpoint(tmp_path / "a", with_trainer_state=True)
    assert ck.meta["x"] == 1 and ck.meta["seed"] == 7 and ck.meta["stage"] == "main" and ck.meta["step"] == 5
    assert ck.meta["wall_time"] == pytest.approx(ck.trainer_state["wall_time"]) and ck.meta["wall_time"] > 0
    assert r.checkpoint == ck.path and r.step == 5 and not r.stopped_early and r.interrupted is None and r.rank == 0
    assert r.steps_per_sec == pytest.approx(5 / r.wall_time, rel=1e-9) and r.wall_time > 0
    assert set(ck.components) == {"decoder"} and set(ck.components["decoder"]) == {"weight"}
    assert r.losses == {"loss": pytest.approx(float((p.seen[-1] * p.c).sum())), "size": 4.0}
    assert set(ck.trainer_state) == {
        "model",
        "optimizers",
        "schedulers",
        "ema",
        "data",
        "rng",
        "step",
        "stage_index",
        "stage_step",
        "wall_time",
    }
    assert ck.trainer_state["ema"] is None and set(ck.trainer_state["data"]) == {"gen", "perm", "pos", "epoch"}
    assert ck.trainer_state["data"]["pos"] == 4 and ck.trainer_state["data"]["epoch"] == 3
    assert (
        set(ck.trainer_state["rng"]) == {"torch", "cuda", "python", "numpy"} and ck.trainer_state["rng"]["cuda"] == []
    )
    trainer(
        Two(), tmp_path / "b", cfg(stages={"pre": 2, "game": 0}, checkpoint_every=1, keep_checkpoints=5), registry
    ).fit()
    assert sorted(q.name for q in (tmp_path / "b" / "checkpoints").iterdir() if q.name.startswith("step")) == [
        "step-00000001",
        "step-00000002",
    ]


def test_resume_restores_the_counters_the_clock_and_the_streams(tmp_path, registry) -> None:
    straight = Line()
    trainer(straight, tmp_path / "s", cfg(steps=6, ema_decay=0.7), registry).fit()
    first = Line()
    r = trainer(first, tmp_path / "r", cfg(steps=6, ema_decay=0.7), registry).fit(stop_at=4)
    assert r.step == 4 and r.stopped_early and r.interrupted is None and first.fitted == []
    wall = load_checkpoint(tmp_path / "r").meta["wall_time"]
    second = Line()
    r = trainer(second, tmp_path / "r", cfg(steps=6, ema_decay=0.7), registry).fit(resume=True)
    assert r.step == 6 and not r.stopped_early and second.begun == []  # a stage is begun once, not on resume
    assert second.draws == straight.draws[4:] and all(torch.equal(a, b) for a, b in zip(second.seen, straight.seen[4:]))
    for x, y in zip(second.batches, straight.batches[4:]):
        assert torch.equal(x["image"], y["image"])
    a, b = (
        load_checkpoint(tmp_path / "s", with_trainer_state=True),
        load_checkpoint(tmp_path / "r", with_trainer_state=True),
    )
    assert torch.equal(a.components["decoder"]["weight"], b.components["decoder"]["weight"])
    assert b.meta["wall_time"] > wall and b.trainer_state["stage_step"] == 6
    assert b.trainer_state["ema"]["updates"] == 6


def test_the_resume_errors(tmp_path, registry) -> None:
    trainer(Line(), tmp_path, cfg(steps=1), registry).fit()
    run = re.escape(str(tmp_path))
    message = rf"^{run} already holds a checkpoint; pass --resume to continue it or choose another --out$"
    with pytest.raises(TrainingError, match=message):
        trainer(Line(), tmp_path, cfg(steps=1), registry).fit()
    message = rf"^--resume: {re.escape(str(tmp_path / 'none'))} holds no checkpoint; train without --resume first$"
    with pytest.raises(TrainingError, match=message):
        trainer(Line(), tmp_path / "none", cfg(), registry).fit(resume=True)
    for key in ("pipeline", "data", "components"):
        other = {**RECIPE, key: {"type": "other"}}
        message = (
            rf"^--resume: the recipe's '{key}' differs from the checkpoint's in {run}; resume with the same "
            r"recipe or train into a new --out$"
        )
        t = Trainer(
            Line(), data(), config=cfg(steps=2), run_dir=tmp_path, recipe=other, progress=False, registry=registry
        )
        with pytest.raises(TrainingError, match=message):
            t.fit(resume=True)


def test_the_trainer_refuses_a_batch_larger_than_the_data_or_split_unevenly(tmp_path, registry, monkeypatch) -> None:
    with pytest.raises(TrainingError, match=r"^train.batch_size 11 exceeds the 10 training items; lower it$"):
        trainer(Line(), tmp_path, cfg(batch_size=11), registry)
    assert trainer(Line(), tmp_path, cfg(batch_size=10), registry).n == 10
    d = data()
    t = Trainer(Line(), d, config=cfg(), run_dir=str(tmp_path), recipe=RECIPE, progress=False, registry=registry)
    assert t.data is not d and t.data == d and t.run_dir == tmp_path and t.registry is registry
    assert t.device == torch.device("cpu") and t.dist == distributed.DistInfo() and t.meta == {}
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    with pytest.raises(TrainingError, match=r"^train.batch_size 4 is not divisible by the 3 processes$"):
        trainer(Line(), tmp_path, cfg(batch_size=4), registry)


def test_sample_grids_use_the_averaged_weights_and_leave_the_run_unchanged(tmp_path, registry, events) -> None:
    plain = Line()
    trainer(plain, tmp_path / "plain", cfg(steps=4, ema_decay=0.5, seed=9), registry).fit()
    p = Line()
    t = trainer(p, tmp_path / "grids", cfg(steps=4, ema_decay=0.5, sample_every=2, sample_n=3, seed=9), registry)
    t.fit()
    assert sorted(q.name for q in (tmp_path / "grids" / "samples").iterdir()) == [
        "step-00000002.png",
        "step-00000004.png",
    ]
    assert [(e[1], e[3], tuple(e[2].shape)) for e in events if e[0] == "image"] == [
        ("samples", 2, (67, 67, 1)),
        ("samples", 4, (67, 67, 1)),
    ]  # three 2 x 2 images enlarged to 32 x 32, two per row
    assert [s[:3] for s in p.sampled] == [(3, 9, False)] * 2
    assert p.draws == plain.draws and all(torch.equal(a, b) for a, b in zip(p.seen, plain.seen))
    assert p.training
    ema = load_checkpoint(tmp_path / "grids").components["decoder"]["weight"]
    assert torch.equal(p.sampled[1][3], ema) and not torch.equal(p.sampled[1][3], p.w.detach())

    class NotReady(Line):
        def ready_to_sample(self):
            return False

    trainer(NotReady(), tmp_path / "none", cfg(steps=2, sample_every=1), registry).fit()
    assert not (tmp_path / "none" / "samples").exists()


def test_a_run_stopped_by_a_signal_or_a_budget(tmp_path, registry) -> None:
    class Signals(Line):
        def training_losses(self, batch, **kw):
            if len(self.batches) == 2:
                os.kill(os.getpid(), signal.SIGINT)
            return super().training_losses(batch, **kw)

    before = signal.getsignal(signal.SIGINT)
    p = Signals()
    r = trainer(p, tmp_path / "sig", cfg(steps=6), registry).fit()
    assert r.interrupted == "SIGINT" and r.stopped_early and r.step == 3 and p.fitted == []
    assert signal.getsignal(signal.SIGINT) is before and load_checkpoint(tmp_path / "sig").step == 3
    p = Line()
    r = trainer(p, tmp_path / "budget", cfg(steps=None, minutes=1e-9), registry).fit()
    assert r.step == 1 and r.stopped_early and r.interrupted is None and len(p.fitted) == 1  # a budget ends normally
    assert p.fit_data is not None and p.fit_data["caption"] == data()["caption"]
    out = []
    thread = threading.Thread(
        target=lambda: out.append(trainer(Line(), tmp_path / "thread", cfg(steps=2), registry).fit())
    )
    thread.start()
    thread.join()
    assert out[0].step == 2 and signal.getsignal(signal.SIGINT) is before


def test_ddp_looks_for_unused_parameters_only_where_a_stage_leaves_some(tmp_path, registry) -> None:
    t = trainer(Two(), tmp_path, cfg(), registry)
    t.stages = [("pre", 3), ("game", 0)]
    assert t._find_unused_parameters() is True  # pre trains g only, d is left out
    t.stages = [("pre", 0), ("game", 3)]
    assert t._find_unused_parameters() is True  # two optimisers
    t.stages = [("pre", 0), ("game", 0)]
    assert t._find_unused_parameters() is False
    t.stages = [("all", 3)]
    assert t._find_unused_parameters() is False
    for declared in (True, False):
        t = trainer(Two(declared=declared), tmp_path, cfg(), registry)
        t.stages = [("pre", 3)]
        assert t._find_unused_parameters() is declared
    t = trainer(Line(), tmp_path, cfg(), registry)
    t.stages = [("main", 3)]
    assert t._find_unused_parameters() is False
    t.pipeline.components["decoder"].weight.requires_grad_(False)
    assert t._find_unused_parameters() is False
    model = nn.Linear(1, 1)
    assert t._wrap(model) is model


def test_the_progress_bar_counts_every_stage(tmp_path, registry) -> None:
    t = trainer(Two(), tmp_path, cfg(stages={"pre": 2, "game": 3}), registry)
    t.stages, t.step = t._stage_steps(), 1
    bar = t._progress_bar()
    assert bar.total == 5 and bar.n == 1 and bar.disable
    t = trainer(Line(), tmp_path, cfg(steps=None, minutes=1.0), registry)
    t.stages, t.step = t._stage_steps(), 0
    assert t._progress_bar().total is None
    t = trainer(Two(), tmp_path, cfg(steps=None, minutes=1.0, stages={"pre": 2, "game": 3}), registry)
    t.stages, t.step = t._stage_steps(), 0
    assert t._progress_bar().total == 5


def test_the_progress_bar_shows_only_on_a_terminal_on_rank_0_when_asked(tmp_path, registry, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    for progress, rank, shown in ((True, 0, True), (False, 0, False), (True, 1, False)):
        t = Trainer(Line(), data(), config=cfg(), run_dir=tmp_path, recipe=RECIPE, progress=progress, registry=registry)
        t.stages, t.step, t.dist = t._stage_steps(), 0, distributed.DistInfo(rank, 2)
        bar = t._progress_bar()
        assert bar.disable is not shown, (progress, rank)
        bar.close()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    t = Trainer(Line(), data(), config=cfg(), run_dir=tmp_path, recipe=RECIPE, progress=True, registry=registry)
    t.stages, t.step = t._stage_steps(), 0
    assert t._progress_bar().disable  # not a terminal


# ------------------------------------------------------------------ EMA


def test_ema_update_decay_and_state() -> None:
    m = nn.Linear(2, 1)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([[1.0, 2.0]]))
        m.bias.fill_(4.0)
    ema = EMA(m, decay=0.95)
    assert ema.decay == 0.95 and ema.updates == 0 and set(ema.shadow) == {"weight", "bias"}
    assert ema.shadow["weight"] is not m.weight and not ema.shadow["weight"].requires_grad
    assert [EMA(m, decay=0.95).current_decay()] == [0.1]
    shadow = torch.tensor([[1.0, 2.0]])
    for n, v in enumerate([3.0, -1.0, 0.5, 2.0]):
        assert ema.current_decay() == pytest.approx(min(0.95, (1 + n) / (10 + n)), rel=1e-15)
        with torch.no_grad():
            m.weight.fill_(v)
        ema.update(m)
        d = min(0.95, (1 + n) / (10 + n))
        shadow = d * shadow + (1 - d) * v
        assert ema.updates == n + 1
    torch.testing.assert_close(ema.shadow["weight"], shadow, rtol=1e-6, atol=0)
    assert ema.shadow["bias"].item() == pytest.approx(4.0)
    ema.updates = 10**6
    assert ema.current_decay() == 0.95
    state = ema.state_dict()
    assert state["decay"] == 0.95 and state["updates"] == 10**6 and state["shadow"] is not ema.shadow
    other = EMA(nn.Linear(2, 1), decay=0.5)
    other.load_state_dict(state)
    assert other.decay == 0.95 and other.updates == 10**6
    assert (
        torch.equal(other.shadow["weight"], ema.shadow["weight"]) and other.shadow["weight"] is not ema.shadow["weight"]
    )
    fresh = nn.Linear(2, 1)
    other.copy_to(fresh)
    assert torch.equal(fresh.weight.detach(), ema.shadow["weight"]) and torch.equal(
        fresh.bias.detach(), ema.shadow["bias"]
    )


def test_ema_weights_for_a_model_with_buffers() -> None:
    m = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    ema = EMA(m, decay=0.9)
    with torch.no_grad():
        for q in m.parameters():
            q.add_(1.0)
    m[1].running_mean.fill_(3.0)
    sd = ema.weights_for(m)
    assert list(sd) == list(m.state_dict())
    assert torch.equal(sd["0.weight"], ema.shadow["0.weight"]) and torch.equal(sd["1.bias"], ema.shadow["1.bias"])
    assert torch.equal(sd["1.running_mean"], torch.full((2,), 3.0)) and not sd["0.weight"].requires_grad
    assert not any(v.requires_grad for v in sd.values())


# ------------------------------------------------------------------ images


def test_to_uint8_maps_minus_one_to_zero_and_one_to_255_channels_last() -> None:
    x = torch.tensor([-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, 0.004], dtype=torch.float64).view(1, 2, 2, 2)
    u = to_uint8(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 2, 2, 2)
    assert u.permute(0, 3, 1, 2).flatten().tolist() == [0, 0, 64, 128, 191, 255, 255, 128]
    assert u[0, 0, 0].tolist() == [0, 191] and u[0, 1, 1].tolist() == [128, 128]


def test_grid_image_tiles_row_major_with_padding_and_enlarges_small_images() -> None:
    x = torch.stack([torch.full((1, 2, 3), v) for v in (0.0, 0.5, 1.0)])  # three 2 x 3 images: 128, 191, 255
    g = grid_image(x, min_side=0)
    assert g.shape == (2 * 3 + 1, 2 * 4 + 1, 1) and g.dtype == torch.uint8  # two per row, two rows, 1-pixel pad
    want = torch.zeros(7, 9, 1, dtype=torch.uint8)
    want[1:3, 1:4], want[1:3, 5:8], want[4:6, 1:4] = 128, 191, 255
    assert torch.equal(g, want)
    g = grid_image(x, nrow=3, pad=2, min_side=0)
    assert g.shape == (2 + 2 + 2, 3 * 5 + 2, 1) and g[2:4, 12:15].eq(255).all() and g[2:4, 7:10].eq(191).all()
    assert g[2:4, 2:5].eq(128).all() and g.sum() == 6 * (128 + 191 + 255)
    big = grid_image(x[:1], nrow=1, pad=0, min_side=6)  # enlarged twice (6 // 3): 4 x 6
    assert big.shape == (4, 6, 1)
    ramp = torch.tensor([[[-1.0, 1.0]]]).view(1, 1, 1, 2)
    assert grid_image(ramp, pad=0, min_side=4).squeeze(-1).tolist() == [[0, 0, 255, 255]] * 2
    assert grid_image(torch.zeros(5, 3, 4, 4)).shape == (2 * 33 + 1, 3 * 33 + 1, 3)  # 32-pixel tiles, 3 per row
    assert grid_image(torch.zeros(1, 1, 11, 11)).shape == (22 + 2, 22 + 2, 1)  # enlarged 32 // 11 = 2 times
    assert grid_image(torch.zeros(1, 3, 2, 2)).shape == (32 + 2, 32 + 2, 3)  # by the side, not the channels


def test_png_round_trip_and_a_bad_file_named(tmp_path: Path) -> None:
    pytest.importorskip("PIL")
    rgb = torch.tensor([[[0, 64, 255], [10, 20, 30]], [[200, 100, 50], [255, 255, 0]]], dtype=torch.uint8)  # (2, 2, 3)
    path = save_png(rgb, tmp_path / "new" / "dir" / "rgb.png")
    assert path == tmp_path / "new" / "dir" / "rgb.png" and path.exists()
    x = load_image(path, size=2, channels=3)
    assert x.shape == (3, 2, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x, rgb.permute(2, 0, 1).float() / 127.5 - 1, rtol=0, atol=1e-6)
    grey = torch.tensor([[[0], [100]], [[200], [255]]], dtype=torch.uint8)
    x = load_image(save_png(grey, tmp_path / "grey.png"), size=2, channels=1)
    assert x.shape == (1, 2, 2) and x.flatten().tolist() == pytest.approx([-1.0, 100 / 127.5 - 1, 200 / 127.5 - 1, 1.0])
    from PIL import Image

    assert Image.open(tmp_path / "grey.png").mode == "L" and Image.open(path).mode == "RGB"
    assert load_image(path, size=4, channels=1).shape == (1, 4, 4)
    images = torch.rand(3, 1, 2, 2) * 2 - 1
    out = save_grid(images, tmp_path / "g" / "grid.png", nrow=3, pad=1, min_side=0)
    assert out == tmp_path / "g" / "grid.png"
    back = torch.from_numpy(np.array(Image.open(out)))
    assert torch.equal(back, grid_image(images, 3, 1, 0).squeeze(-1))
    default = save_grid(images, tmp_path / "default.png")  # pad 1, 2 x 2 images enlarged to 32 x 32
    assert torch.equal(torch.from_numpy(np.array(Image.open(default))), grid_image(images).squeeze(-1))
    assert Image.open(default).size == (2 * 33 + 1, 2 * 33 + 1)
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(
        GenzooError, match=rf"^could not read image {re.escape(str(bad))}: .*; pass a PNG or JPEG file$"
    ):
        load_image(bad, size=2, channels=3)
    with pytest.raises(GenzooError, match=r"could not read image .*missing.png"):
        load_image(tmp_path / "missing.png", size=2, channels=3)


# ------------------------------------------------------------------ torchrun


def test_dist_info_and_setup_from_torchrun_environment(monkeypatch) -> None:
    info = distributed.DistInfo()
    assert (info.rank, info.world_size, info.local_rank, info.is_main, info.enabled) == (0, 1, 0, True, False)
    assert distributed.DistInfo(2, 4, 1).is_main is False and distributed.DistInfo(2, 4, 1).enabled is True
    assert distributed.DistInfo(0, 4).is_main is True
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: calls.append(backend))
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert distributed.setup("cpu") == distributed.DistInfo()
    monkeypatch.setenv("RANK", "1")
    assert distributed.setup("cpu") == distributed.DistInfo() and calls == []  # WORLD_SIZE missing
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.setup("cpu") == distributed.DistInfo(1, 1, 0) and calls == []  # one process: no group
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert distributed.setup("cpu") == distributed.DistInfo(1, 3, 2) and calls == ["gloo"]
    assert distributed.setup("cuda") == distributed.DistInfo(1, 3, 2) and calls == ["gloo", "nccl"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.setup("cpu") == distributed.DistInfo(1, 2, 2) and calls == ["gloo", "nccl", "gloo"]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    distributed.setup("cpu")
    assert calls == ["gloo", "nccl", "gloo"]
    monkeypatch.delenv("RANK")
    assert distributed.setup("cpu") == distributed.DistInfo()


def test_any_flag_is_the_max_over_ranks(monkeypatch) -> None:
    assert distributed.any_flag(True, distributed.DistInfo(), torch.device("cpu")) is True
    assert distributed.any_flag(False, distributed.DistInfo(), torch.device("cpu")) is False
    seen = []

    def all_reduce(t, op):
        seen.append((t.clone(), op, t.device))
        t.fill_(1.0)  # another rank raised it

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    assert distributed.any_flag(False, distributed.DistInfo(0, 2), torch.device("cpu")) is True
    assert seen[0][1] == torch.distributed.ReduceOp.MAX and seen[0][0].tolist() == [0.0]

    class Reduced(Exception):
        pass

    def on_device(t, op):
        seen.append(t.device)
        raise Reduced  # a meta tensor has no value to read back

    monkeypatch.setattr(torch.distributed, "all_reduce", on_device)
    with pytest.raises(Reduced):
        distributed.any_flag(True, distributed.DistInfo(0, 2), torch.device("meta"))
    assert seen[-1] == torch.device("meta")  # the flag crosses on the training device (nccl needs CUDA tensors)
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: seen.append(t.clone()))
    assert distributed.any_flag(True, distributed.DistInfo(1, 2), torch.device("cpu")) is True
    assert distributed.any_flag(False, distributed.DistInfo(1, 2), torch.device("cpu")) is False
    assert seen[-2].tolist() == [1.0] and seen[-1].tolist() == [0.0]


def test_resume_without_the_saved_ema_or_clock_and_a_failure_names_the_resumed_checkpoint(
    tmp_path, registry, monkeypatch
) -> None:
    """An EMA saved but not asked for on resume is left alone; a state saved before the run's clock existed resumes
    at 0 s; a non-finite loss right after a resume names the checkpoint it resumed from."""
    trainer(Line(), tmp_path / "ema", cfg(steps=4, ema_decay=0.5), registry).fit(stop_at=2)
    t = trainer(Line(), tmp_path / "ema", cfg(steps=4), registry)
    assert t.fit(resume=True).step == 4 and t.ema is None
    trainer(Line(), tmp_path / "noema", cfg(steps=4), registry).fit(stop_at=2)
    assert trainer(Line(), tmp_path / "noema", cfg(steps=4, ema_decay=0.5), registry).fit(resume=True).step == 4
    state = Trainer._state

    def without_clock(self):
        out = state(self)
        del out["wall_time"]
        return out

    monkeypatch.setattr(Trainer, "_state", without_clock)
    trainer(Line(), tmp_path / "old", cfg(steps=4), registry).fit(stop_at=2)
    monkeypatch.setattr(Trainer, "_state", state)
    t = trainer(Line(), tmp_path / "old", cfg(steps=4), registry)
    r = t.fit(resume=True)
    assert t.wall_time == pytest.approx(r.wall_time) and r.wall_time < 1.0

    class Nan(Line):
        def training_losses(self, batch, **kw):
            return {**super().training_losses(batch, **kw), "size": torch.tensor(float("nan"))}

    trainer(Line(), tmp_path / "nan", cfg(steps=4), registry).fit(stop_at=2)
    path = re.escape(str(tmp_path / "nan" / "checkpoints" / "step-00000002"))
    with pytest.raises(TrainingError, match=rf"; the last good checkpoint is {path}; lower train.lr"):
        trainer(Nan(), tmp_path / "nan", cfg(steps=4), registry).fit(resume=True)


def test_a_second_rank_draws_its_own_noise_and_shard_and_saves_nothing(tmp_path, registry, events, monkeypatch) -> None:
    """Under torchrun (simulated: rank 1 of 2, DDP and the all-reduce stubbed): torch's RNG seeded with seed + rank,
    reseeded apart from rank 0's restored stream on resume; every other item of the global batch; no logs, grids or
    checkpoints; the result carries the rank."""
    wrapped = []
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda t, op: None)
    monkeypatch.setattr(
        torch.nn.parallel, "DistributedDataParallel", lambda m, find_unused_parameters: wrapped.append(m) or m
    )

    def rank1(p, run, config) -> Trainer:
        t = trainer(p, run, config, registry)
        t.dist = distributed.DistInfo(1, 2, 1)
        return t

    p = Line()
    r = rank1(p, tmp_path / "r1", cfg(steps=3, seed=4, sample_every=1)).fit()
    assert r.rank == 1 and r.checkpoint is None and r.step == 3 and len(wrapped) == 1
    assert not (tmp_path / "r1" / "checkpoints").exists() and not (tmp_path / "r1" / "samples").exists()
    assert events == [] and p.sampled == []
    torch.manual_seed(5)
    assert p.draws[0][0] == torch.rand(1).item()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(4))
    assert p.batches[0]["image"].flatten().long().tolist() == perm[1:4:2].tolist()
    trainer(Line(), tmp_path / "resume", cfg(steps=4, seed=4), registry).fit(stop_at=2)
    p = Line()
    rank1(p, tmp_path / "resume", cfg(steps=4, seed=4)).fit(resume=True)
    torch.manual_seed(4 + 1 + 1_000_003 * 2)
    assert p.draws[0][0] == torch.rand(1).item()


def test_the_progress_bar_advances_one_step_at_a_time_with_the_loss_and_stage(tmp_path, registry, monkeypatch) -> None:
    class Bar:
        def __init__(self) -> None:
            self.updates, self.postfix, self.closed = [], [], False

        def update(self, n) -> None:
            self.updates.append(n)

        def set_postfix(self, **kw) -> None:
            self.postfix.append(kw)

        def close(self) -> None:
            self.closed = True

    bar = Bar()
    monkeypatch.setattr(Trainer, "_progress_bar", lambda self: bar)
    p = Line()
    trainer(p, tmp_path, cfg(steps=3), registry).fit()
    losses = [float((w * p.c).sum()) for w in p.seen]
    assert bar.updates == [1, 1, 1] and bar.closed
    assert bar.postfix == [{"loss": f"{v:.4f}", "stage": "main"} for v in losses]


def test_a_time_budget_stops_at_the_first_step_past_it(tmp_path, registry, monkeypatch) -> None:
    """The budget is minutes * 60 s after the loop starts, checked after each step (a clock that ticks 1 s per read):
    3.99 s of budget stops after step 4 of 10, and the run ends normally (its fit after training runs)."""
    import genzoo.training.trainer as trainer_module

    ticks = iter(range(1000))
    clock = SimpleNamespace(monotonic=lambda: float(next(ticks)), perf_counter=time.perf_counter)
    monkeypatch.setattr(trainer_module, "time", clock)
    p = Line()
    r = trainer(p, tmp_path, cfg(steps=10, minutes=3.99 / 60), registry).fit()
    assert r.step == 4 and r.stopped_early and r.interrupted is None and len(p.fitted) == 1


def test_a_constant_schedule_holds_the_lr_after_its_warmup(tmp_path, registry, events) -> None:
    trainer(Line(), tmp_path, cfg(steps=5, lr=0.3, warmup_steps=3, lr_schedule="constant"), registry).fit()
    lrs = [e[1]["lr/main"] for e in events if e[0] == "metrics"]
    assert lrs == pytest.approx([0.3 * 2 / 3, 0.3, 0.3, 0.3, 0.3], rel=1e-12)


def test_a_stage_followed_by_a_trained_one_is_checkpointed_at_its_end(tmp_path, registry) -> None:
    trainer(Two(), tmp_path, cfg(stages={"pre": 2, "game": 2}, checkpoint_every=2, keep_checkpoints=5), registry).fit()
    saved = sorted(q.name for q in (tmp_path / "checkpoints").iterdir() if q.name.startswith("step"))
    assert saved == ["step-00000002", "step-00000004"]
