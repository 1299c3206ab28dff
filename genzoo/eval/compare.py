"""``genzoo compare``: train or load several models, evaluate them on one sample stream, write a leaderboard.

An entry is a recipe name, optionally with a sampler for its sampling (``ddpm-shapes@ddim:25``); a
recipe is trained once (into ``OUT/runs/RECIPE``, or loaded from there if it already holds a
checkpoint) and every entry of it is evaluated. Training under ``--budget-minutes`` is cut into
segments with a quick FD after each, which gives quality against training time. A model that
fails becomes a row with its error.
"""

from __future__ import annotations

import csv
import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from genzoo.eval.evaluate import DEFAULT_METRICS, EvalContext, EvalSettings, MetricFn


@dataclass
class Entry:
    """``RECIPE[@SAMPLER[:STEPS]]``."""

    text: str
    recipe: str
    sampler: str | None = None
    steps: int | None = None

    @classmethod
    def parse(cls, text: str) -> Entry:
        recipe, _, rest = text.partition("@")
        sampler, _, steps = rest.partition(":")
        return cls(text, recipe, sampler or None, int(steps) if steps else None)


@dataclass
class Row:
    name: str
    recipe: str
    family: str = ""
    data: str = ""
    params_m: float = float("nan")
    train_minutes: float = float("nan")
    train_steps: int = 0
    figures: dict[str, float] = field(default_factory=dict)
    grid: str = ""
    error: str = ""


COLUMNS = [
    "fd",
    "kid",
    "precision",
    "recall",
    "density",
    "coverage",
    "class_coverage",
    "label_accuracy",
    "shape_accuracy",
    "colour_accuracy",
    "recon_mse",
    "code_perplexity",
    "codes_used",
    "iw_bpd",
    "elbo_bpd",
    "images_per_s",
    "nfe",
]


def compare(
    entries: Sequence[str],
    *,
    out: Path,
    settings: EvalSettings = EvalSettings(),
    budget_minutes: float | None = None,
    metric_names: Sequence[str] = DEFAULT_METRICS,
    sweep: dict[str, list[int]] | None = None,
    segments: int = 3,
    device: torch.device | None = None,
    files: Sequence[str | Path] = (),
    sets: Sequence[str] = (),
    log: Callable[[str], None] = print,
) -> list[Row]:
    from genzoo import api
    from genzoo.checkpoint import has_checkpoint, load_checkpoint
    from genzoo.eval.judges import load_judge
    from genzoo.plugins import default_registry
    from genzoo.training import resolve_device

    device = device or resolve_device("auto")
    registry = default_registry()
    metrics: dict[str, MetricFn] = {m: registry.build("metric", {"type": m}) for m in metric_names}
    fd_only = {"fd": registry.build("metric", {"type": "fd"})}
    out.mkdir(parents=True, exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    rows: list[Row] = []
    curves: dict[str, list[tuple[float, float]]] = {}
    step_curves: dict[str, dict[str, list[tuple[int, float]]]] = {}
    trained: dict[str, tuple[Path, Any, str]] = {}
    for text in entries:
        e = Entry.parse(text)
        row = Row(name=text, recipe=e.recipe)
        t0 = time.perf_counter()
        try:
            if e.recipe not in trained and has_checkpoint(e.recipe):  # a run directory (an imported model): as it is
                ckpt_recipe = load_checkpoint(e.recipe).recipe
                trained[e.recipe] = (Path(e.recipe), api.build_data(ckpt_recipe), ckpt_recipe["pipeline"]["type"])
            if e.recipe not in trained:
                run_dir = out / "runs" / e.recipe
                source, family = _train(
                    e.recipe,
                    run_dir,
                    files=files,
                    sets=sets,
                    budget_minutes=budget_minutes,
                    segments=segments,
                    settings=settings,
                    fd_only=fd_only,
                    curve=curves.setdefault(e.recipe, []),
                    device=device,
                    log=log,
                )
                trained[e.recipe] = (run_dir, source, family)
            run_dir, source, family = trained[e.recipe]
            model = api.load_model(run_dir, device=device, sampler=e.sampler, steps=e.steps)
            judge = load_judge(source.spec.name, source.cfg.model_dump(), device=device)
            ev = EvalContext(model, source, judge, settings, device=device)
            for fn in metrics.values():
                row.figures.update(fn(ev))
            meta = getattr(model, "checkpoint_meta", {})
            row.family, row.data = family, source.spec.name
            row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
            row.train_minutes, row.train_steps = meta.get("wall_time", float("nan")) / 60, int(meta.get("step", 0))
            from genzoo.training.images import save_grid

            grid = (
                out / "grids" / (text.replace("@", "_").replace(":", "-").replace("+", "p").replace("/", "_") + ".png")
            )
            save_grid(ev.samples[:64], grid)
            row.grid = str(grid.relative_to(out))
            if (
                sweep
                and model.components.get("sampler") is not None
                and getattr(model.components["sampler"], "kind", None) is not None
                and model.components["sampler"].kind.value == "diffusion"
                and e.sampler is None
            ):
                step_curves[e.recipe] = _sweep(run_dir, source, judge, sweep, settings, fd_only, device, log)
        except Exception as exc:  # a failing model is a row, not a crash
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            (out / "errors.log").open("a").write(f"== {text}\n{traceback.format_exc()}\n")
        log(f"compare: {text}: {_summary(row)} ({time.perf_counter() - t0:.0f}s)")
        rows.append(row)
    rows.sort(key=lambda r: (bool(r.error), r.figures.get("fd", math.inf)))
    write_leaderboard(rows, out, settings=settings, budget_minutes=budget_minutes)
    _plots(out, curves, step_curves)
    (out / "curves.json").write_text(json.dumps({"training": curves, "steps": step_curves}, indent=1))
    return rows


def _train(
    recipe: str, run_dir: Path, *, files, sets, budget_minutes, segments, settings, fd_only, curve, device, log
) -> tuple[Any, str]:
    """Train (or reuse) a recipe in ``run_dir``; under a budget, in segments with a quick FD after each."""
    from genzoo import api
    from genzoo.checkpoint import has_checkpoint
    from genzoo.eval.judges import load_judge
    from genzoo.training import TrainConfig, Trainer

    sets = list(sets)  # the same --set for every recipe, e.g. data.image_size=16: one dataset for all
    if budget_minutes:
        sets += [
            f"train.minutes={budget_minutes / segments}",
            "train.steps=null",
            "train.stages=null",
            "train.sample_every=0",
        ]
    resolved = api.resolve_recipe(recipe, files=files, sets=sets)
    source = api.build_data(resolved)
    family = resolved["pipeline"]["type"]
    if has_checkpoint(run_dir):
        log(f"compare: {recipe}: using the checkpoint in {run_dir}")
        return source, family
    train = source.split("train")
    pipeline = api.create_model(resolved, data_spec=source.spec)
    meta = {
        "data_spec": api.data_spec_dict(source.spec),
        "data_fingerprint": train.fingerprint(),
        "recipe_name": recipe,
    }
    config = TrainConfig.model_validate(resolved["train"])
    if budget_minutes and len(getattr(pipeline, "stages", ("main",))) > 1:
        # a staged model splits the budget between stages instead of spending it all on the first
        per = _steps_in(pipeline, train, config, budget_minutes / len(pipeline.stages), device)
        config = config.model_copy(update={"stages": per, "minutes": None})
        segments = 1
    judge = load_judge(source.spec.name, source.cfg.model_dump(), device=device)
    quick = replace(settings, samples=min(settings.samples, 256))
    for i in range(segments):
        result = Trainer(
            pipeline, train.tensors(), config=config, run_dir=run_dir, recipe=resolved, meta=meta, progress=False
        ).fit(resume=i > 0)
        if result.interrupted:  # Ctrl-C stops the comparison (the checkpoint is saved), not just this segment
            raise KeyboardInterrupt(result.interrupted)
        model = api.load_model(run_dir, device=device)
        fd = fd_only["fd"](EvalContext(model, source, judge, quick, device=device))["fd"]
        minutes = model.checkpoint_meta.get("wall_time", 0.0) / 60
        curve.append((minutes, fd))
        log(f"compare: {recipe}: step {result.step}, {minutes:.2f} min, quick FD {fd:.2f}")
    return source, family


def _steps_in(pipeline, train, config, minutes: float, device, probe_steps: int = 6) -> dict[str, int]:
    """How many steps of each stage fit in ``minutes``, every stage timed on a few steps of a throwaway copy.

    A stage's time per step is taken between its first and its last step, so neither the set-up, the first step's
    allocations nor a ``begin_stage`` (fitting on the training split) counts: timed from the start, six steps of the
    latent diffusion's first stage read 0.31 s a step where it ran at 0.05 s, and the budget went a quarter used.
    """
    import copy
    import tempfile

    from genzoo.training import Trainer

    probe = copy.deepcopy(pipeline)
    stages = list(getattr(pipeline, "stages", ("main",)))
    with tempfile.TemporaryDirectory() as d:
        cfg = config.model_copy(
            update={
                "steps": None,
                "stages": {s: probe_steps for s in stages},
                "minutes": None,
                "checkpoint_every": 10**9,
                "log_every": 1,
                "sample_every": 0,
            }
        )
        trainer = Trainer(probe, train.tensors(), config=cfg, run_dir=d, recipe={}, meta={}, progress=False)
        trainer.fit(stop_at=probe_steps * len(stages))
        rows = [json.loads(line) for line in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    out = {}
    for s in stages:
        t = [r["time"] for r in rows if r.get("stage") == s]
        per_step = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else math.inf
        out[s] = max(1, int(minutes * 60 / per_step))
    return out


def _sweep(run_dir, source, judge, sweep, settings, fd_only, device, log) -> dict[str, list[tuple[int, float]]]:
    from genzoo import api

    out: dict[str, list[tuple[int, float]]] = {}
    for sampler, steps_list in sweep.items():
        for steps in steps_list:
            model = api.load_model(run_dir, device=device, sampler=sampler, steps=steps)
            fd = fd_only["fd"](EvalContext(model, source, judge, settings, device=device))["fd"]
            out.setdefault(sampler, []).append((steps, fd))
            log(f"compare: sweep {run_dir.name} {sampler}:{steps} FD {fd:.2f}")
    return out


def _summary(row: Row) -> str:
    if row.error:
        return f"ERROR {row.error}"
    return ", ".join(
        f"{k} {row.figures[k]:.3g}" for k in ("fd", "precision", "recall", "images_per_s") if k in row.figures
    )


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def write_leaderboard(rows: Sequence[Row], out: Path, *, settings: EvalSettings, budget_minutes: float | None) -> None:
    """``leaderboard.md`` / ``.csv`` / ``.json``: one row per entry, sorted by FD (errors last)."""
    cols = [c for c in COLUMNS if any(c in r.figures for r in rows)]
    head = ["model", "family", "data", *cols, "params_M", "train_min", "train_steps", "error"]
    table = [
        [
            r.name,
            r.family,
            r.data,
            *[r.figures.get(c, float("nan")) for c in cols],
            r.params_m,
            r.train_minutes,
            r.train_steps,
            r.error,
        ]
        for r in rows
    ]
    with open(out / "leaderboard.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        w.writerows([[_fmt(v) for v in t] for t in table])
    (out / "leaderboard.json").write_text(
        json.dumps(
            {
                "settings": {
                    "samples": settings.samples,
                    "seed": settings.seed,
                    "split": settings.split,
                    "precision": settings.precision,
                    "budget_minutes": budget_minutes,
                },
                "rows": [{**{k: v for k, v in r.__dict__.items() if k != "figures"}, **r.figures} for r in rows],
            },
            indent=1,
            default=str,
        )
    )
    generated = "" if settings.precision == "fp32" else f", generated in {settings.precision}"
    lines = [
        f"# Leaderboard ({settings.samples} samples per model against the {settings.split} split, seed "
        f"{settings.seed}{generated}; "
        f"FD, KID, precision/recall, density/coverage in judge features; lower FD is better)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    lines += ["| " + " | ".join(_fmt(v) for v in t) + " |" for t in table]
    lines += ["", *[f"![{r.name}]({r.grid})" for r in rows if r.grid]]
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")


def _plots(out: Path, curves: dict, step_curves: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if any(curves.values()):
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for name, pts in curves.items():
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
        ax.set(
            xlabel="training time (min)",
            ylabel="FD (judge features, quick)",
            yscale="log",
            title="quality vs training time",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "fd_vs_training_time.png", dpi=120)
        plt.close(fig)
    for name, per_sampler in step_curves.items():
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for sampler, pts in per_sampler.items():
            ax.plot(*zip(*pts), marker="o", label=sampler)
        ax.set(
            xlabel="sampling steps",
            ylabel="FD (judge features)",
            xscale="log",
            yscale="log",
            title=f"{name}: quality vs steps",
        )
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"fd_vs_steps_{name}.png", dpi=120)
        plt.close(fig)
