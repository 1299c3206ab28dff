"""Where a run's curves go: the one interface the trainer calls, and the run directory's own JSONL log.

A logger is a component of kind ``logger``: ``train.loggers`` lists their specs (default ``[jsonl]``, the
``metrics.jsonl`` every genzoo tool reads) and ``genzoo train --log tensorboard --log wandb`` adds more, each
registered by its plugin (``genzoo list --kind logger``). The trainer calls every configured logger the same way
(Lightning's ``Logger``: start, log metrics, log images, finish) and never asks which one it holds; a logger records
what it can and leaves the rest (the JSONL log keeps no pictures: the grids are ``samples/step-N.png``).
``genzoo eval`` of a run sends its figures to the run's loggers as ``eval/*`` at the checkpoint's step
(:func:`log_evaluation`). docs/training.md, "Training curves".
"""

from __future__ import annotations

import contextlib
import difflib
import json
import random
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from genzoo.errors import TrainingError
from genzoo.registry import Registry, component, registered_name, split_spec

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunInfo:
    """What a logger is started with.

    ``phase``: ``train`` (a new run), ``resume`` (a run continued from its checkpoint at ``step``: what was logged
    after that step came from the part of the run that is repeated, and a logger may drop it) or ``evaluation``
    (``genzoo eval`` adding figures to a finished run)."""

    run_dir: Path
    name: str
    config: Mapping[str, Any]  # the resolved recipe: the run's hyperparameters
    phase: Literal["train", "resume", "evaluation"] = "train"
    step: int = 0


class TrainingLogger:
    """A destination for a run's scalars and pictures; each method does nothing unless a logger overrides it."""

    def start(self, run: RunInfo) -> None:
        """Open the destination (called once, on rank 0, before the first step)."""

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One logged step: loss terms, ``lr/<optimiser>``, ``grad_norm``, ``it_s``, ``time`` (floats) and the
        ``stage`` (a string); or ``eval/<figure>`` from an evaluation."""

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        """A picture: uint8 (H, W, C), C 1 or 3 (the sample grid under ``samples``)."""

    def finish(self, status: Literal["success", "failed"] = "success") -> None:
        """Flush and close; ``failed`` when the run ended with an error."""


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of a record (a scalar logger has no place for the ``stage`` string)."""
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def untouched_random_state() -> Iterator[None]:
    """Python's, numpy's and torch's CPU random streams as they were: a logging library that draws from them (an
    id, a temporary name) must not change what a seeded run draws next."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)


class LoggerGroup:
    """Every configured logger, called the same way in the order listed."""

    def __init__(self, loggers: Sequence[TrainingLogger]) -> None:
        self.loggers = list(loggers)

    def start(self, run: RunInfo) -> None:
        with untouched_random_state():
            for logger in self.loggers:
                try:
                    logger.start(run)
                except Exception as e:  # a library's own error (no login, a bad project name): one line naming it
                    first = (str(e).strip().splitlines() or [""])[0]
                    raise TrainingError(
                        f"train.loggers: logger '{registered_name(logger)}' could not start: {type(e).__name__}: "
                        f"{first}; fix its fields (`genzoo info logger:{registered_name(logger)}`) or drop it"
                    ) from e

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        with untouched_random_state():
            for logger in self.loggers:
                logger.log_metrics(metrics, step)

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        with untouched_random_state():
            for logger in self.loggers:
                logger.log_image(tag, image, step)

    def finish(self, status: Literal["success", "failed"] = "success") -> None:
        with untouched_random_state():
            for logger in self.loggers:
                logger.finish(status)


def build_loggers(specs: Sequence[Any], registry: Registry | None = None) -> LoggerGroup:
    """The loggers of ``train.loggers`` built from ``registry`` (default: the installed plugins'). A name no plugin
    registered is one error naming the field and the choices, or the plugin that should have registered it and why
    it did not load (its extra is not installed)."""
    from genzoo.plugins import default_registry, plugin_infos

    failed = {i.name: i.error for i in plugin_infos() if i.error} if registry is None else {}
    registry = registry or default_registry()
    built = []
    for i, spec in enumerate(specs):
        where = f"train.loggers[{i}]: "
        name, _ = split_spec("logger", spec, where=where)
        if name not in registry.names("logger"):
            if name in failed:
                raise TrainingError(
                    f"{where}logger '{name}' is not available: plugin '{name}' failed to load: {failed[name]}"
                )
            close = difflib.get_close_matches(name, registry.names("logger"), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise TrainingError(
                f"{where}unknown logger '{name}'{hint}; choose from {', '.join(registry.names('logger'))} "
                "(`genzoo plugins` shows plugins that failed to load)"
            )
        built.append(registry.build("logger", spec, where=where))
    return LoggerGroup(built)


# --------------------------------------------------------------------------- the JSONL log


class JsonlConfig(BaseModel):
    """No settings: the file is always ``RUN/metrics.jsonl``, where the tools that read it look."""

    model_config = ConfigDict(extra="forbid")


@component("logger", "jsonl", config=JsonlConfig)
class JsonlLogger(TrainingLogger):
    """RUN/metrics.jsonl, one JSON line per logged step (the default; `genzoo runs`, `genzoo serve` and the model
    card read it).

    Appended as it happens (a line cut by a crash is skipped by every reader); a resumed run first drops the lines
    after its checkpoint's step, so the file reads as if the run had never stopped."""

    def __init__(self, cfg: JsonlConfig) -> None:
        self.cfg, self.path = cfg, None

    def start(self, run: RunInfo) -> None:
        self.path = run.run_dir / METRICS_FILE
        if run.phase == "resume" and self.path.is_file():
            kept = [line for line in self.path.read_text().splitlines(keepends=True) if _step_of(line) <= run.step]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(kept))
            tmp.replace(self.path)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}, default=float) + "\n")


def _step_of(line: str) -> float:
    """A line's step; a line that is not a whole record (cut by a crash) counts as after every step."""
    try:
        step = json.loads(line).get("step")
    except (json.JSONDecodeError, AttributeError):
        return float("inf")
    return step if isinstance(step, int) else float("inf")


# --------------------------------------------------------------------------- evaluations


def evaluation_metrics(record: Mapping[str, Any]) -> dict[str, float]:
    """An evaluation's figures as logger scalars: ``eval/fd``, or ``eval/fd@sampler=ddim,steps=50`` for one run with
    swapped components or ``--set`` overrides, so that curves of different settings are not mixed."""
    settings = [f"{k}={v}" for k, v in (record.get("swaps") or {}).items()] + list(record.get("sets") or [])
    suffix = "@" + ",".join(settings) if settings else ""
    return {f"eval/{k}{suffix}": v for k, v in scalars(record.get("figures") or {}).items()}


def log_evaluation(run_dir: Path, recipe: Mapping[str, Any], record: Mapping[str, Any]) -> None:
    """Send one ``genzoo eval`` record to the loggers the run was trained with, at the evaluated step. A logger
    that cannot be built here (its extra is not installed on this machine) is skipped with one line on stderr: the
    evaluation itself is recorded in ``evaluations.jsonl`` whatever happens here."""
    from genzoo.training.config import TrainConfig

    try:
        specs = TrainConfig.model_validate(recipe.get("train") or {}).loggers
    except ValueError:  # a recipe saved by another version: its default loggers
        specs = TrainConfig().loggers
    metrics = evaluation_metrics(record)
    try:
        group = build_loggers(specs)
    except TrainingError as e:
        print(f"genzoo: the evaluation is not sent to the run's loggers: {e}", file=sys.stderr)
        return
    if not metrics:
        return
    step = int(record.get("step") or 0)
    run = RunInfo(run_dir=run_dir, name=str(recipe.get("name") or run_dir.name), config=recipe, phase="evaluation")
    try:
        group.start(run)
        try:
            group.log_metrics(metrics, step)
        finally:
            group.finish()
    except Exception as e:  # the figures are computed and recorded: a logger's failure must not lose them
        print(f"genzoo: the evaluation is not sent to the run's loggers: {type(e).__name__}: {e}", file=sys.stderr)
