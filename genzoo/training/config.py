"""The trainer's settings: one pydantic model, the ``train:`` section of a recipe."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class OptimizerConfig(BaseModel):
    """Per-optimiser overrides (e.g. a GAN's Adam with betas (0.5, 0.999))."""

    model_config = ConfigDict(extra="forbid")
    lr: float | None = Field(None, gt=0, description="learning rate; None: the trainer's lr")
    betas: tuple[float, float] | None = Field(None, description="Adam betas; None: the trainer's")
    weight_decay: float | None = Field(None, ge=0, description="decoupled weight decay; None: the trainer's")


class TrainConfig(BaseModel):
    """The ``train:`` section: schedule, optimisers, EMA, checkpoints, logs, device (docs/training.md)."""

    model_config = ConfigDict(extra="forbid")
    steps: int | None = Field(
        1000, ge=1, description="optimisation steps per stage; null with --minutes runs until the budget"
    )
    minutes: float | None = Field(
        None, gt=0, description="wall-clock budget; whichever of steps and minutes comes first stops"
    )
    batch_size: int = Field(64, ge=1, description="GLOBAL batch size (split across processes under torchrun)")
    lr: float = Field(2e-4, gt=0, description="peak learning rate of AdamW")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine decay or constant")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="the cosine decays to lr * min_lr_ratio")
    weight_decay: float = Field(0.0, ge=0, description="AdamW decoupled weight decay")
    betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas")
    grad_clip: float | None = Field(1.0, gt=0, description="clip the global gradient norm to this; null: off")
    ema_decay: float | None = Field(
        0.999, gt=0, lt=1, description="EMA of the weights (saved and used for sampling); null: off"
    )
    checkpoint_every: int = Field(
        1000, ge=1, description="write a checkpoint every N steps (and at the end and on SIGINT/SIGTERM)"
    )
    keep_checkpoints: int = Field(2, ge=1, description="how many checkpoints to keep")
    sample_every: int = Field(0, ge=0, description="write a sample grid PNG every N steps; 0: off")
    sample_n: int = Field(16, ge=1, description="images per sample grid")
    log_every: int = Field(50, ge=1, description="send the step's losses, lr and speed to the loggers every N steps")
    loggers: list[str | dict[str, Any]] = Field(
        default_factory=lambda: ["jsonl"],
        description="logger specs (`genzoo list --kind logger`): jsonl writes metrics.jsonl, which `genzoo runs` "
        "reads; `genzoo train --log NAME` adds one",
    )
    seed: int = Field(0, description="seeds the model init, the data order and every random draw")
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16 autocast (on CPU only where the CPU has bf16 units)"
    )
    compile: bool = Field(False, description="torch.compile the training step's model")
    channels_last: bool = Field(
        True,
        description="store conv weights NHWC while training (the U-Net step measured 1.05-1.09x on CPU, "
        "benchmarks/results.md); inference always uses it (genzoo.api.for_inference)",
    )
    optimizer_ratio: dict[str, int] = Field(
        default_factory=dict, description="steps per optimiser per iteration, e.g. {discriminator: 2}"
    )
    stages: dict[str, int] | None = Field(
        None, description="steps per training stage of a staged pipeline; null: `steps` for each"
    )
    optimizers: dict[str, OptimizerConfig] = Field(
        default_factory=dict, description="per-optimiser overrides of lr, betas, weight_decay"
    )
