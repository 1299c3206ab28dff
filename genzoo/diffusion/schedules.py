"""Noise schedules and timestep respacing (Ho et al. 2020; Nichol & Dhariwal 2021). Tables in float64."""

from __future__ import annotations

import math

import numpy as np


def get_named_beta_schedule(name: str, num_timesteps: int) -> np.ndarray:
    """Betas b_1..b_T (float64).

    ``linear``: 1e-4..0.02 at T = 1000 (DDPM Sec. 4), both ends scaled by 1000/T for other T so
    abar_T stays near 0 (Improved DDPM's convention). ``cosine``: abar_t = f(t)/f(0) with
    f(t) = cos^2((t/T + s)/(1 + s) pi/2), s = 0.008, b_t = min(1 - abar_t/abar_{t-1}, 0.999)
    (Improved DDPM Eq. 17; the clip avoids the singularity at t = T).
    """
    if name == "linear":
        scale = 1000 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":

        def f(t: np.ndarray) -> np.ndarray:
            return np.cos((t / num_timesteps + 0.008) / 1.008 * math.pi / 2) ** 2

        t = np.arange(num_timesteps + 1, dtype=np.float64)
        return np.minimum(1 - f(t[1:]) / f(t[:-1]), 0.999)
    raise ValueError(f"unknown beta schedule '{name}'; use 'linear' or 'cosine'")


FAST27 = "10,10,3,2,2"  # the sections of GLIDE's "fast27" grid


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> set[int]:
    """The timesteps kept when respacing (Improved DDPM Sec. 4).

    ``250`` or ``[250]``: 250 steps evenly over the whole range, first and last included.
    ``"10,10,3"``: the range cut into 3 equal sections with 10, 10 and 3 steps in them.
    ``"ddim50"``: DDIM's uniform stride, range(0, T, stride) with exactly 50 entries.
    ``"fast27"``: GLIDE's upsampler grid (glide-text2im's respace.py): ``"10,10,3,2,2"`` with t = T - 3 in place of
    T - 1, "to reduce DDIM artifacts from the noisiest timesteps".
    """
    if section_counts == "fast27":
        return (space_timesteps(num_timesteps, FAST27) - {num_timesteps - 1}) | {num_timesteps - 3}
    if isinstance(section_counts, str) and section_counts.startswith("ddim"):
        want = int(section_counts[4:])
        for stride in range(1, num_timesteps):
            if len(range(0, num_timesteps, stride)) == want:
                return set(range(0, num_timesteps, stride))
        raise ValueError(
            f"cannot take exactly {want} evenly strided steps out of {num_timesteps}; use a plain step count"
        )
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


SPACINGS = ("even", "leading", "trailing", "linspace")


def spaced_grid(num_timesteps: int, steps: int, spacing: str, offset: int = 0) -> set[int]:
    """The timesteps kept by diffusers' ``timestep_spacing`` (Lin et al. 2023, Table 2), for ``steps`` evaluations.

    ``leading``: k * (T // steps) + offset; ``trailing``: round(T - k T / steps) - 1; ``linspace``:
    round(linspace(0, T - 1)).
    diffusers' DDPM and DDIM schedulers step from t to t - T // steps, so a grid is the respaced process they run only
    when its neighbours are T // steps apart (and its last point is below T // steps); otherwise this raises.
    """
    if spacing == "even":
        return space_timesteps(num_timesteps, steps)
    ratio = num_timesteps // steps
    if spacing == "leading":
        grid = [k * ratio + offset for k in range(steps)]
    elif spacing == "trailing":
        grid = sorted(int(t) - 1 for t in np.round(np.arange(num_timesteps, 0, -num_timesteps / steps)))
    elif spacing == "linspace":
        grid = sorted(int(t) for t in np.linspace(0, num_timesteps - 1, steps).round())
    else:
        raise ValueError(f"unknown timestep spacing '{spacing}'; use one of {', '.join(SPACINGS)}")
    if len(set(grid)) != steps or grid[0] < 0 or grid[-1] >= num_timesteps:
        raise ValueError(
            f"{spacing} spacing of {steps} steps over {num_timesteps} timesteps gives {grid[:3]}...; use fewer steps"
        )
    if grid[0] >= ratio or any(b - a != ratio for a, b in zip(grid, grid[1:])):
        raise ValueError(
            f"{spacing} spacing of {steps} steps over {num_timesteps} timesteps is not evenly {ratio} "
            "apart, so diffusers' step (t -> t - T // steps) is not a respaced process; use 'leading' "
            "spacing or other steps"
        )
    return set(grid)


GRIDS = ("uniform", "quadratic", "log-snr", "karras")


def solver_grid(
    abar: np.ndarray, points: int, grid: str, rho: float = 7.0, sigma_max: float | None = 80.0
) -> list[int]:
    """``points`` timesteps of a process with cumulative products ``abar`` (index 0 = t 1), ascending, for a
    solver's grid.

    ``uniform``: ``space_timesteps`` (even in t). ``quadratic``: t_k = (k / (n - 1))^2 (T - 1) (DDIM's "quad",
    Song et al. 2021, Appendix D.2). ``log-snr``: even in lambda = log(alpha / sigma) (DPM-Solver, Lu et al. 2022).
    ``karras``: sigma_k = (sigma_hi^(1/rho) + k / (n - 1) (sigma_lo^(1/rho) - sigma_hi^(1/rho)))^rho in
    sigma = sqrt((1 - abar) / abar) (EDM, Karras et al. 2022, Eq. 5). sigma_lo is t = 1's; sigma_hi is t = T's,
    or ``sigma_max`` when t = T is noisier (the cosine schedule's sigma_T is 2e4, where the data prediction no
    longer changes): the grid then starts at t = T and spreads its other points from ``sigma_max`` down (EDM's
    sigma_max is 80). Each target is rounded to the nearest integer timestep in log sigma, the ends are t = T and
    t = 1, and a collision moves to the next free timestep, so the grid has exactly ``points`` entries and the
    respaced process has the exact abar of each.
    """
    abar = np.asarray(abar, dtype=np.float64)
    last = len(abar) - 1
    if grid not in GRIDS:
        raise ValueError(f"unknown sampler grid '{grid}'; use one of {', '.join(GRIDS)}")
    if points < 2 or points > len(abar):
        raise ValueError(
            f"a {grid} grid of {points} points over {len(abar)} timesteps is impossible; use 2 to {len(abar)} points"
        )
    if grid == "uniform":
        return sorted(space_timesteps(len(abar), points))
    if grid == "quadratic":
        idx = [int(i) for i in np.round(np.linspace(0.0, 1.0, points) ** 2 * last)]
    else:
        log_sigma = 0.5 * (np.log1p(-abar) - np.log(abar))  # -lambda, increasing in t
        lo, hi = log_sigma[0], log_sigma[-1]
        capped = sigma_max is not None and hi > math.log(sigma_max)
        n = points - 1 if capped else points  # capped: t = T, then n targets from sigma_max down
        hi = math.log(sigma_max) if capped else hi
        k = np.linspace(0.0, 1.0, n)
        if grid == "log-snr":
            target = lo + k * (hi - lo)
        else:
            s_lo, s_hi = math.exp(lo / rho), math.exp(hi / rho)
            target = rho * np.log(s_lo + k * (s_hi - s_lo))
        j = np.clip(np.searchsorted(log_sigma, target), 1, last)  # the nearest of the neighbours j - 1 and j
        idx = [int(i) for i in np.where(target - log_sigma[j - 1] <= log_sigma[j] - target, j - 1, j)]
        idx = idx + [last] if capped else idx
    idx[0], idx[-1] = 0, last
    for n in range(1, points - 1):  # strictly increasing: a collision moves up ...
        idx[n] = max(idx[n], idx[n - 1] + 1)
    for n in range(points - 2, 0, -1):  # ... and never past the next entry
        idx[n] = min(idx[n], idx[n + 1] - 1)
    return idx


def betas_with_float32_abar(name: str, num_timesteps: int, betas: np.ndarray | None = None) -> np.ndarray:
    """Betas (float64) whose float64 cumulative product of 1 - b is the float32 abar diffusers' schedulers use.

    diffusers makes the betas in float32 (``linear``: ``torch.linspace`` in float32; others: float64 values rounded)
    and takes ``torch.cumprod`` of the alphas in float32. Its abar then differs from the float64 one by ~4e-7
    (relative), which a 50-step DDIM run can grow to ~1e-4 in the images. A process built from these betas has
    diffusers' abar to float64 precision, so the same float32 tables. ``betas``: explicit b_1..b_T instead of ``name``.
    """
    import torch

    if betas is not None:
        b32 = torch.as_tensor(np.asarray(betas, dtype=np.float64)).float()
    elif name == "linear":
        scale = 1000 / num_timesteps
        b32 = torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float32)
    else:
        b32 = torch.as_tensor(get_named_beta_schedule(name, num_timesteps)).float()
    abar = torch.cumprod(1 - b32, dim=0).double().numpy()
    return 1 - abar / np.append(1.0, abar[:-1])
