"""TensorBoard: every numeric logged value as a scalar, the sample grid as an image, the recipe as text."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from genzoo.registry import component
from genzoo.training.loggers import RunInfo, TrainingLogger, scalars


class TensorBoardConfig(BaseModel):
    """Where the event files go and how often they are flushed."""

    model_config = ConfigDict(extra="forbid")
    subdir: str = Field("tensorboard", description="the event files go to RUN/<subdir>")
    flush_secs: int = Field(30, ge=1, description="write pending events to disk at least this often (seconds)")


@component("logger", "tensorboard", config=TensorBoardConfig)
class TensorBoardLogger(TrainingLogger):
    """TensorBoard event files in RUN/tensorboard: losses, learning rates, speed, sample grids, `genzoo eval` figures;
    view with `tensorboard --logdir RUN` (or the folder of several runs).

    A ``torch.utils.tensorboard.SummaryWriter``. A resumed run purges the events logged after its checkpoint's step
    (TensorBoard's ``purge_step``), so the curves read as one uninterrupted run."""

    def __init__(self, cfg: TensorBoardConfig) -> None:
        self.cfg, self.writer = cfg, None

    def start(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        purge = run.step + 1 if run.phase == "resume" else None
        self.writer = SummaryWriter(
            str(run.run_dir / self.cfg.subdir), purge_step=purge, flush_secs=self.cfg.flush_secs
        )
        if run.phase == "train":  # the hyperparameters, once, on the Text tab
            self.writer.add_text(
                "recipe", "```json\n" + json.dumps(dict(run.config), indent=1, default=str) + "\n```", 0
            )

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        for tag, value in scalars(metrics).items():
            self.writer.add_scalar(tag, value, step)

    def log_image(self, tag: str, image: Tensor, step: int) -> None:
        self.writer.add_image(tag, image.numpy(), step, dataformats="HWC")

    def finish(self, status: str = "success") -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
