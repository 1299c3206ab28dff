"""Weights & Biases: the logged values and sample grids in a W&B run, offline unless the user asks for the network."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.registry import component
from genzoo.training.loggers import RunInfo, TrainingLogger, scalars

STEP = "trainer/step"  # W&B's x axis for every curve (as Lightning's `trainer/global_step`)
RUN_ID_FILE = "genzoo-run-id"  # under RUN/wandb/: the W&B run id a resumed run and its evaluations continue


class WandbConfig(BaseModel):
    """The W&B project, names and mode of the run."""

    model_config = ConfigDict(extra="forbid")
    project: str = Field("genzoo", description="the W&B project")
    entity: str | None = Field(None, description="the W&B team or user; null: the account's default")
    name: str | None = Field(None, description="the run's display name; null: the recipe's name")
    group: str | None = Field(None, description="group runs (e.g. the rows of one comparison)")
    tags: list[str] = Field(default_factory=list, description="tags of the run")
    mode: Literal["offline", "online", "disabled"] | None = Field(
        None,
        description="null: $WANDB_MODE when set, else offline (nothing is sent; `wandb sync` uploads later); "
        "online streams to the W&B server",
    )
    console: Literal["off", "auto", "wrap", "redirect"] = Field(
        "off", description="capture the process's console output into the run (W&B's `console` setting)"
    )


@component("logger", "wandb", config=WandbConfig)
class WandbLogger(TrainingLogger):
    """A Weights & Biases run in RUN/wandb, offline unless mode or $WANDB_MODE asks for the network: losses, learning
    rates, speed, sample grids, `genzoo eval` figures, the recipe as its config; upload with `wandb sync`.

    ``wandb.init`` with an id kept in ``RUN/wandb/genzoo-run-id``, so a resumed run and the run's later evaluations go
    to the same W&B run. Every curve is plotted against ``trainer/step``: an evaluation logged after training lands at
    the step it evaluated, which W&B's own monotonic step would refuse."""

    def __init__(self, cfg: WandbConfig) -> None:
        self.cfg, self.run = cfg, None

    def start(self, run: RunInfo) -> None:
        import wandb

        folder = run.run_dir / "wandb"
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / RUN_ID_FILE
        if not id_file.is_file():
            id_file.write_text(secrets.token_hex(4))  # not the `random` module: the run's seeded streams stay untouched
        # mode None lets wandb read $WANDB_MODE itself; without it, offline: the network only when asked for
        mode = self.cfg.mode or (None if os.environ.get("WANDB_MODE") else "offline")
        self.run = wandb.init(
            project=self.cfg.project,
            entity=self.cfg.entity,
            name=self.cfg.name or run.name,
            group=self.cfg.group,
            tags=self.cfg.tags or None,
            dir=str(run.run_dir),
            id=id_file.read_text().strip(),
            resume="allow",
            mode=mode,
            config=dict(run.config),
            settings=wandb.Settings(console=self.cfg.console),
        )
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP, step_sync=True)

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        self.run.log({STEP: step, **scalars(metrics)})

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        import wandb

        pixels = image.numpy()
        self.run.log({STEP: step, tag: wandb.Image(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)})

    def finish(self, status: str = "success") -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if status == "success" else 1)
            self.run = None
