"""Numeric precision of training and of sampling: one option name, one autocast context for both."""

from __future__ import annotations

import functools
import time
import warnings
from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("fp32", "bf16")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether a bf16 matmul on this CPU runs at least half as fast as fp32 (timed once, ~10 ms where it does).
    CPUs without bf16 units emulate it hundreds of times slower than fp32."""

    def rate(dtype: torch.dtype) -> float:
        a = torch.randn(256, 256, generator=torch.Generator().manual_seed(0)).to(
            dtype
        )  # not the global RNG: resume stays exact
        a @ a
        t0 = time.perf_counter()
        for _ in range(4):
            a @ a
        return 1 / (time.perf_counter() - t0)

    return rate(torch.bfloat16) >= 0.5 * rate(torch.float32)


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """bf16 autocast on ``device`` (matmuls, convolutions and attention in bf16; norms, softmax and losses in
    fp32), or nothing for fp32. bf16 on a CPU is opt-in: without bf16 units it is hundreds of times slower,
    and a warning says so (docs/performance.md)."""
    if precision == "fp32":
        return nullcontext()
    if precision != "bf16":
        raise ValueError(f"precision '{precision}' is unknown; use one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if device.type == "cpu" and not cpu_has_fast_bf16():
        warnings.warn("bf16 on this CPU is far slower than fp32 (it has no bf16 units); use fp32 here", stacklevel=2)
    return torch.autocast(device.type, dtype=torch.bfloat16)
