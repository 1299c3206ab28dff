"""What a run directory holds beside its checkpoints, read back: the training log, evaluations, sample grids.

A run directory (``genzoo train --out DIR``) holds ``latest``, ``checkpoints/``, ``metrics.jsonl`` (the
trainer's log), ``samples/`` (periodic grids) and ``evaluations.jsonl`` (one line per ``genzoo eval``).
``genzoo runs DIR`` tabulates every run under DIR; ``genzoo push`` writes a model card from the same facts. An
evaluation also goes to the loggers the run was trained with (``eval/*`` in metrics.jsonl, TensorBoard, W&B).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

EVALUATIONS = "evaluations.jsonl"


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory of a run or of one of its checkpoints; None for a lone checkpoint (e.g. pulled)."""
    path = Path(path)
    for candidate in (path, path.parent.parent):
        if (candidate / "latest").is_file():
            return candidate
    return None


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interrupted write
            continue
    return out


def record_evaluation(path: str | Path, record: dict[str, Any]) -> Path | None:
    """Append one evaluation (settings and figures) to the run's ``evaluations.jsonl``; None if there is no run."""
    run = run_dir_of(path)
    if run is None:
        return None
    try:
        with open(run / EVALUATIONS, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
    except OSError:  # a read-only run (a mirror) is still evaluated, just not recorded
        return None
    from genzoo.checkpoint import read_json, resolve
    from genzoo.training.loggers import log_evaluation

    log_evaluation(run, read_json(resolve(path) / "recipe.json"), record)  # eval/* beside the run's training curves
    return run / EVALUATIONS


def evaluations(run: Path) -> list[dict[str, Any]]:
    return _jsonl(run / EVALUATIONS)


def metrics(run: Path) -> list[dict[str, Any]]:
    """Every record of the run's ``metrics.jsonl`` (a line cut by an interrupted write is skipped)."""
    return _jsonl(run / "metrics.jsonl")


def last_loss(run: Path) -> float | None:
    losses = [r["loss"] for r in metrics(run) if isinstance(r.get("loss"), (int, float))]
    return losses[-1] if losses else None


def best(run: Path, metric: str = "fd") -> float | None:
    """The lowest ``metric`` among the run's recorded evaluations."""
    values = [
        e["figures"][metric] for e in evaluations(run) if isinstance(e.get("figures", {}).get(metric), (int, float))
    ]
    values = [v for v in values if not math.isnan(v)]
    return min(values) if values else None


def latest_grid(run: Path) -> Path | None:
    grids = sorted((run / "samples").glob("step-*.png"))
    return grids[-1] if grids else None


def summary(run: Path) -> dict[str, Any]:
    """One row of ``genzoo runs``: recipe, step, last loss, best FD, the latest checkpoint's size in MB."""
    from genzoo.checkpoint import read_json, resolve

    ckpt = resolve(run)
    meta, recipe = read_json(ckpt / "meta.json"), read_json(ckpt / "recipe.json")
    size = sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file() and not f.name.startswith("trainer."))
    return {
        "run": str(run),
        "recipe": recipe.get("name", "?"),
        "step": meta.get("step"),
        "last_loss": last_loss(run),
        "best_fd": best(run),
        "size_mb": round(size / 2**20, 2),
    }


def find_runs(root: str | Path) -> list[Path]:
    """Every run directory under ``root`` (``root`` itself included), sorted."""
    root = Path(root)
    return sorted({p.parent for p in root.rglob("latest") if p.is_file() and (p.parent / "checkpoints").is_dir()})
