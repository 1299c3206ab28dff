"""The trainer every family shares (docs/training.md)."""

from genzoo.training.config import OptimizerConfig, TrainConfig
from genzoo.training.trainer import Trainer, TrainResult, lr_factor, resolve_device

__all__ = ["OptimizerConfig", "TrainConfig", "Trainer", "TrainResult", "lr_factor", "resolve_device"]
