"""Timing and FLOP counting shared by the benchmarks: the GPU is synchronised around every timed call,
since CUDA launches return before the kernels finish."""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

from genzoo.nn.unet import flop_counter


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def best_time(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of ``repeat`` calls after one warm-up, in seconds."""
    fn()
    times = []
    for _ in range(repeat):
        synchronize()
        t0 = time.perf_counter()
        fn()
        synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


def mean_time(fn: Callable[[], Any], n: int, warmup: int = 3) -> float:
    """Seconds per call over ``n`` back-to-back calls (one synchronisation at the end: what a training loop sees)."""
    for _ in range(warmup):
        fn()
    synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    synchronize()
    return (time.perf_counter() - t0) / n


def flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` as torch.utils.flop_counter counts them (matmuls, convs, attention)."""
    with flop_counter() as fc:
        fn()
    return fc.get_total_flops()
