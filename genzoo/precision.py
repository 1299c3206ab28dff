"""Numeric precision of training and of sampling: one option name, one autocast context for both."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` (matmuls, convolutions and attention in bf16; norms, softmax and losses in
    fp32), or nothing for fp32. bf16 on a CPU is opt-in: without bf16 units it is hundreds of times slower
    (docs/performance.md)."""
    if precision == "fp32":
        return nullcontext()
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision '{precision}' is unknown; use one of {', '.join(PRECISIONS)}")
