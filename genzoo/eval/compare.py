"""``genzoo compare``: train or load several models, evaluate them on one sample stream, write a leaderboard.

An entry is a recipe name (or a run directory), optionally with a sampler for its sampling
(``ddpm-shapes@ddim:25``) or a guidance scale (``adm-digits@classifier:2``); a list of values sweeps it
(``glide-shapes@cfg:1,2,3,5``: one row per scale, and FD, precision, recall and accuracy plotted against
the scale, the fidelity-diversity trade-off of Dhariwal & Nichol 2021 Sec. 5 / Ho & Salimans 2021 Fig. 1). A
recipe is trained once (into ``OUT/runs/RECIPE``, or loaded from there if it already holds a
checkpoint) and every entry of it is evaluated. Training under ``--budget-minutes`` is cut into
segments with a quick FD after each, which gives quality against training time. A model that
fails becomes a row with its error.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from genzoo.errors import GenzooError
from genzoo.eval.evaluate import DEFAULT_METRICS, EvalContext, EvalSettings, MetricFn
from genzoo.eval.networks import describe_network
from genzoo.pipelines import Conditioning


@dataclass
class Entry:
    """``RECIPE[@SAMPLER[:STEPS]][@GUIDANCE[:SCALE]]``: what one row evaluates."""

    text: str
    recipe: str
    sampler: str | None = None
    steps: int | None = None
    guidance: str | None = None
    scale: float | None = None
    sweep: tuple[str, str] | None = None  # (the sweep's name, "steps" | "scale") when a list was expanded
    error: Exception | None = None  # the entry did not parse: its row carries this

    @property
    def swaps(self) -> dict[str, Any]:
        """The swap keywords of :func:`genzoo.api.load_model` this entry sets."""
        keys = ("sampler", "steps", "guidance", "scale")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @classmethod
    def expand(cls, text: str, registry: Any) -> list[Entry]:
        """The entries ``text`` names: one per value of a list (``adm-digits@classifier:0,1,2`` is three rows);
        each ``@NAME`` is looked up in the registry, a sampler taking steps and a guidance a scale."""
        recipe, *variants = text.split("@")
        options: list[list[tuple[str, str, str | None]]] = []  # per variant: (kind, name, value or None) choices
        for variant in variants:
            name, values = split_values(variant)
            kind = next((k for k in ("sampler", "guidance") if name in registry.names(k)), None)
            if kind is None and name != "none":
                raise GenzooError(
                    f"compare entry {text!r}: {name!r} is neither a sampler ({', '.join(registry.names('sampler'))}) "
                    f"nor a guidance ({', '.join(registry.names('guidance'))}); write RECIPE@SAMPLER:STEPS or "
                    "RECIPE@GUIDANCE:S1,S2,..."
                )
            options.append([(kind or "guidance", name, v) for v in values or [None]])
        swept = [choices[0][:2] for choices in options if len(choices) > 1]
        out = []
        for picked in itertools.product(*options):
            e = cls(text, recipe)
            for kind, name, value in picked:
                field, number = ("steps", int) if kind == "sampler" else ("scale", float)
                setattr(e, kind, name)
                setattr(e, field, None if value is None else _number(value, number, text))
            if swept:  # the row's name holds its values; the sweep's name, the swept variant's name alone
                parts = [f"{n}:{v}" if v is not None else n for _, n, v in picked]
                e.text = "@".join([recipe, *parts])
                kind, name = swept[-1]
                key = "@".join(
                    [recipe, *(n if (k, n) == swept[-1] else part for (k, n, _), part in zip(picked, parts))]
                )
                e.sweep = (key, "steps" if kind == "sampler" else "scale")
            out.append(e)
        return out


def split_values(text: str) -> tuple[str, list[str]]:
    """``NAME:V1,V2,...`` -> (NAME, [V1, V2, ...]); ``NAME`` alone has no values. The one parser of both an
    entry's ``@`` variants and ``--sweep SAMPLER:S1,S2``."""
    name, _, values = text.partition(":")
    return name, [v.strip() for v in values.split(",") if v.strip()]


def parse_sweep(text: str) -> tuple[str, list[int]]:
    """``--sweep SAMPLER:S1,S2,...``: the sampler and its steps."""
    name, values = split_values(text)
    return name, [_number(v, int, f"--sweep {text}") for v in values]


def _number(value: str, kind: type, where: str) -> Any:
    try:
        return kind(value)
    except ValueError:
        what = "integer sampler steps, e.g. ddim:10,25,50" if kind is int else "guidance scales, e.g. cfg:1,2,3"
        raise GenzooError(f"{where!r}: {value!r} is not a number; expected {what}") from None


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
    prompt_grid: str = ""  # a caption model's samples for each --prompt, one row per prompt
    error: str = ""
    implementation: str = ""  # the decoder network's plugin and component (genzoo.eval.networks)
    gflop: float = float("nan")  # GFLOP of one forward of it on one sample


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
    "size_accuracy",
    "position_accuracy",
    "caption_accuracy",
    "recon_mse",
    "code_perplexity",
    "codes_used",
    "iw_bpd",
    "elbo_bpd",
    "vlb_bpd",
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
    prompts: Sequence[str] = (),
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
    sweeps: dict[str, dict[str, Any]] = {}
    for text, e in _expand_all(entries, registry):
        row = Row(name=text, recipe=e.recipe)
        t0 = time.perf_counter()
        try:
            if e.error is not None:
                raise e.error
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
            model = api.load_model(run_dir, device=device, **e.swaps)
            judge = load_judge(source.spec.name, source.cfg.model_dump(), device=device)
            ev = EvalContext(model, source, judge, settings, device=device)
            for fn in metrics.values():
                row.figures.update(fn(ev))
            row.implementation, row.gflop = describe_network(model, registry)
            meta = getattr(model, "checkpoint_meta", {})
            row.family, row.data = family, source.spec.name
            row.params_m = sum(p.numel() for p in model.parameters()) / 1e6
            row.train_minutes, row.train_steps = meta.get("wall_time", float("nan")) / 60, int(meta.get("step", 0))
            from genzoo.training.images import save_grid

            grid = out / "grids" / (_safe(text) + ".png")
            save_grid(ev.samples[:64], grid)
            row.grid = str(grid.relative_to(out))
            if prompts and getattr(model, "condition", None) is Conditioning.caption:
                grid = out / "grids" / (_safe(text) + "_prompts.png")
                save_grid(_prompt_samples(model, prompts, settings.seed, device), grid, nrow=PER_PROMPT)
                row.prompt_grid = str(grid.relative_to(out))
            if (
                sweep
                and model.components.get("sampler") is not None
                and getattr(model.components["sampler"], "kind", None) is not None
                and model.components["sampler"].kind.value == "diffusion"
                and e.sampler is None
                and e.sweep is None
            ):
                step_curves[e.recipe] = _sweep(run_dir, source, judge, sweep, settings, fd_only, device, log)
        except Exception as exc:  # a failing model is a row, not a crash
            row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:300]
            (out / "errors.log").open("a").write(f"== {text}\n{traceback.format_exc()}\n")
        log(f"compare: {text}: {_summary(row)} ({time.perf_counter() - t0:.0f}s)")
        rows.append(row)
        if e.sweep is not None and not row.error:
            key, axis = e.sweep
            value = e.scale if axis == "scale" else e.steps
            sweeps.setdefault(key, {"axis": axis, "points": []})["points"].append((value, dict(row.figures)))
    rows.sort(key=lambda r: (bool(r.error), r.figures.get("fd", math.inf)))
    write_leaderboard(rows, out, settings=settings, budget_minutes=budget_minutes, prompts=prompts)
    _plots(out, curves, step_curves)
    _sweep_plots(out, sweeps)
    (out / "curves.json").write_text(json.dumps({"training": curves, "steps": step_curves, "sweeps": sweeps}, indent=1))
    return rows


PER_PROMPT = 8


def _prompt_samples(model: Any, prompts: Sequence[str], seed: int, device: torch.device) -> torch.Tensor:
    """``PER_PROMPT`` samples of each prompt, prompt after prompt, one generator seeded once: every model
    draws from the same seed, so the grids differ only by the model."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.cat([model.sample(PER_PROMPT, {"caption": [p] * PER_PROMPT}, generator=g) for p in prompts])


def _expand_all(entries: Sequence[str], registry: Any) -> list[tuple[str, Entry]]:
    """Every row's (name, entry); an entry that does not parse is one row carrying its error."""
    out = []
    for text in entries:
        try:
            out += [(e.text, e) for e in Entry.expand(text, registry)]
        except GenzooError as exc:
            out.append((text, Entry(text, text.partition("@")[0], error=exc)))
    return out


def _safe(text: str) -> str:
    """An entry as a file name: ``adm-digits@classifier:2`` -> ``adm-digits_classifier-2``."""
    return text.replace("@", "_").replace(":", "-").replace("+", "p").replace("/", "_")


def _train(
    recipe: str, run_dir: Path, *, files, sets, budget_minutes, segments, settings, fd_only, curve, device, log
) -> tuple[Any, str]:
    """Train (or reuse) a recipe in ``run_dir``; under a budget, in segments with a quick FD after each."""
    from genzoo import api
    from genzoo.checkpoint import has_checkpoint
    from genzoo.eval.judges import load_judge
    from genzoo.training import TrainConfig, Trainer

    # the same --set for every recipe, e.g. data.image_size=16: one dataset for all
    resolved = api.resolve_recipe(recipe, files=files, sets=list(sets))
    recipe_stages = resolved["train"].get("stages") or {}  # a staged budget keeps the recipe's ratio of steps
    if budget_minutes:
        resolved["train"].update(minutes=budget_minutes / segments, steps=None, stages=None, sample_every=0)
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
        # a staged model splits the budget between stages as its recipe splits its training time, instead of
        # spending it all on the first
        config = budgeted_stages(
            config, _steps_in(pipeline, train, config, budget_minutes, device, recipe_stages), recipe_stages
        )
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


def budgeted_stages(config: Any, per: dict[str, int], recipe_stages: dict[str, int]) -> Any:
    """``config`` training ``per`` steps in each stage. A budget that buys a fraction f < 1 of the recipe's steps
    keeps the shape of its learning-rate schedule: the warm-up shrinks to f of the recipe's too, or a short stage
    would end inside it (glide-shapes' upsampler in a 20-minute `make demo-text`: 228 steps of a 500-step warm-up)."""
    fraction = min((per[s] / n for s, n in recipe_stages.items() if n and s in per), default=1.0)
    update: dict[str, Any] = {"stages": per, "minutes": None}
    if fraction < 1 and config.warmup_steps:
        update["warmup_steps"] = max(1, round(config.warmup_steps * fraction))
    return config.model_copy(update=update)


def _steps_in(pipeline, train, config, minutes: float, device, shares: dict[str, int], probe_steps: int = 6) -> dict:
    """Steps per stage that fit in ``minutes`` together, every stage timed on a few steps of a throwaway copy.

    Each stage gets the share of ``minutes`` that its recipe steps (``shares``) take of the recipe's whole training
    time at the timed rates; a stage the recipe does not name gets an equal share of the time.

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
    per_step = {}
    for s in stages:
        t = [r["time"] for r in rows if r.get("stage") == s]
        per_step[s] = (t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else math.inf
    if all(s in shares for s in stages) and sum(shares[s] * per_step[s] for s in stages) > 0:
        scale = minutes * 60 / sum(shares[s] * per_step[s] for s in stages)
        return {s: max(1, int(shares[s] * scale)) for s in stages}
    return {s: max(1, int(minutes * 60 / len(stages) / per_step[s])) for s in stages}


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


def write_leaderboard(
    rows: Sequence[Row], out: Path, *, settings: EvalSettings, budget_minutes: float | None, prompts: Sequence[str] = ()
) -> None:
    """``leaderboard.md`` / ``.csv`` / ``.json``: one row per entry, sorted by FD (errors last)."""
    cols = [c for c in COLUMNS if any(c in r.figures for r in rows)]
    head = ["model", "family", "data", "implementation", *cols, "gflop_per_fwd", "params_M", "train_min", "train_steps"]
    head += ["error"]
    table = [
        [
            r.name,
            r.family,
            r.data,
            r.implementation,
            *[r.figures.get(c, float("nan")) for c in cols],
            r.gflop,
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
    if with_prompts := [r for r in rows if r.prompt_grid]:
        lines += ["", f"One row per prompt, {PER_PROMPT} samples each: " + "; ".join(f'"{p}"' for p in prompts), ""]
        lines += [f"![{r.name}: prompts]({r.prompt_grid})" for r in with_prompts]
    (out / "leaderboard.md").write_text("\n".join(lines) + "\n")


def _plots(out: Path, curves: dict, step_curves: dict) -> None:
    if any(curves.values()):
        lines = {name: pts for name, pts in curves.items() if pts}
        axes = ("training time (min)", "FD (judge features, quick)", "quality vs training time")
        _line_plot(out / "fd_vs_training_time.png", lines, *axes)
    for name, per_sampler in step_curves.items():
        axes = ("sampling steps", "FD (judge features)", f"{name}: quality vs steps")
        _line_plot(out / f"fd_vs_steps_{name}.png", per_sampler, *axes, logx=True)


def _line_plot(path: Path, lines: dict[str, list], xlabel: str, ylabel: str, title: str, *, logx: bool = False) -> None:
    """One FD curve per named list of (x, FD) points, FD on a log axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, pts in lines.items():
        ax.plot(*zip(*pts), marker="o", label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if logx else "linear", yscale="log", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_plots(out: Path, sweeps: dict[str, dict[str, Any]]) -> None:
    """``sweep_NAME.png`` per swept entry: FD, precision, recall and the judge's accuracies against the value
    (a guidance scale: the fidelity-diversity trade-off)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, sweep in sweeps.items():
        pts = sorted(sweep["points"], key=lambda p: p[0])
        if len(pts) < 2:
            continue
        xs = [x for x, _ in pts]
        accuracies = sorted({k for _, f in pts for k in f if k.endswith("_accuracy")})
        panels = [("fd", ["fd"]), ("precision", ["precision"]), ("recall", ["recall"]), ("accuracy", accuracies)]
        fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
        for ax, (title, keys) in zip(axes, panels):
            for k in keys:
                ax.plot(xs, [f.get(k, float("nan")) for _, f in pts], marker="o", label=k.removesuffix("_accuracy"))
            ax.set(xlabel="guidance scale" if sweep["axis"] == "scale" else "sampler steps", title=title)
            if len(keys) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(f"{key}: fidelity vs diversity", fontsize=9)
        fig.tight_layout()
        fig.savefig(out / f"sweep_{_safe(key)}.png", dpi=120)
        plt.close(fig)
