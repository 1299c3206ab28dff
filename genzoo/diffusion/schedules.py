"""Noise schedules and timestep respacing (Ho et al. 2020; Nichol & Dhariwal 2021). Tables in float64."""

from __future__ import annotations

import math

import numpy as np


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas b_1..b_T: ``linear`` (1e-4..0.02 at T=1000, ends scaled by 1000/T) or ``cosine`` (s=0.008, b <= 0.999)."""
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":  # Improved DDPM Eq. 17
        f = lambda t: math.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return np.array([min(1 - f(i + 1) / f(i), 0.999) for i in range(num_timesteps)], dtype=np.float64)
    raise ValueError(f"unknown beta schedule '{name}'; use 'linear' or 'cosine'")


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
    """The timesteps kept when respacing: ``250``, ``"10,10,3"`` (steps per equal section) or ``"ddim50"``."""
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return set(range(0, num_timesteps, stride))
        raise ValueError(f"cannot take exactly {want} evenly strided steps out of {num_timesteps}")
    if isinstance(section_counts, int):
        section_counts = [section_counts]
    elif isinstance(section_counts, str):
        section_counts = [int(x) for x in section_counts.split(",")]
    size, extra = divmod(num_timesteps, len(section_counts))
    start, kept = 0, set()
    for i, count in enumerate(section_counts):
        section = size + (1 if i < extra else 0)
        if count > section:
            raise ValueError(f"cannot take {count} steps out of a section of {section} timesteps")
        stride = (section - 1) / (count - 1) if count > 1 else 1
        kept |= {start + round(stride * j) for j in range(count)}
        start += section
    return kept
