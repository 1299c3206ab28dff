"""Timing and FLOP counting shared by the benchmarks: the GPU is synchronised around every timed call,
since CUDA launches return before the kernels finish."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from genzoo.nn.unet import UNetConfig, flop_counter

# The pair every peer comparison times: genzoo's U-Net with conv resampling and diffusers' UNet2DModel, equal FLOPs
PEER_UNET = UNetConfig(
    in_channels=3,
    image_size=32,
    model_channels=64,
    channel_mult=[1, 2, 2],
    num_res_blocks=2,
    attention_resolutions=[16, 8],
    resblock_updown=False,
)


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


def diffusers_unet() -> torch.nn.Module:
    """diffusers' UNet2DModel with PEER_UNET's FLOPs (ImportError without the bench extra)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64, 128, 128),
        layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    )
