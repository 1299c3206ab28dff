"""lucidrains' ``GaussianDiffusion`` as genzoo's Gaussian process (the diffusion decoder's fields) and sampler.

* ``beta_schedule`` linear / cosine / sigmoid (with ``schedule_fn_kwargs``) over ``timesteps``: genzoo's named
  ``schedule`` where its float64 betas are genzoo's to float64 rounding (relative 1e-12; they differ by ~1e-16), else
  ``betas``: its float64 values (sigmoid always, and schedule arguments other than the defaults);
* ``objective`` pred_noise / pred_x0 / pred_v: ``mean_type`` eps / x0 / v;
* ``p_sample`` steps with the posterior variance and adds no noise at t = 0: ``var_type`` fixed-small;
* x0_hat clamped to [-1, 1] in ``p_sample`` and ``ddim_sample``: ``clip_range`` 1;
* ``auto_normalize`` true (its [0, 1] data mapped to [-1, 1]): genzoo's images are in [-1, 1] already;
* ``sampling_timesteps`` None (= T): ``p_sample_loop``, the ``ddpm`` sampler over T steps; S < T: ``ddim_sample``,
  the ``ddim`` sampler on its grid with ``eta`` = ``ddim_sampling_eta`` and eps rederived from the clamped x0_hat
  (``clipped_eps``).

Its DDIM grid is ``linspace(-1, T - 1, S + 1)`` truncated to integers: genzoo's ``leading`` spacing with offset
T / S - 1 when S divides T, refused (field ``sampling_timesteps``) when no genzoo spacing gives it. Refused too:
``auto_normalize`` false (its Trainer then feeds [0, 1] images while x0_hat is still clamped to [-1, 1]: no genzoo
range holds that) and a non-square ``image_size``. Training-only fields (``offset_noise_strength``,
``min_snr_loss_weight``, ``immiscible``) do not change sampling; they are recorded, not mapped.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from genzoo.diffusion.schedules import get_named_beta_schedule, space_timesteps, spaced_grid
from genzoo.errors import GenzooError

MEAN = {"pred_noise": "eps", "pred_x0": "x0", "pred_v": "v"}
SCHEDULES = ("linear", "cosine", "sigmoid")
TRAINING_ONLY = ("offset_noise_strength", "min_snr_loss_weight", "min_snr_gamma", "immiscible")


class DiffusionArgs(BaseModel):
    """``GaussianDiffusion``'s constructor arguments. None: read from the checkpoint's buffers (betas, loss_weight)
    when it has them, else GaussianDiffusion's default (T 1000, sigmoid, pred_v)."""

    model_config = ConfigDict(extra="forbid")
    image_size: int | list[int] = Field(..., description="the side it was trained at (its checkpoints omit it)")
    timesteps: int | None = Field(None, ge=1, description="T; None: the checkpoint's, else 1000")
    sampling_timesteps: int | None = Field(None, ge=1, description="DDIM steps; None: T ancestral steps")
    objective: Literal["pred_noise", "pred_x0", "pred_v"] | None = Field(
        None, description="None: the checkpoint's loss_weight decides, else pred_v"
    )
    beta_schedule: Literal["linear", "cosine", "sigmoid"] | None = Field(
        None, description="None: the checkpoint's betas decide, else sigmoid"
    )
    schedule_fn_kwargs: dict[str, float] = Field(default_factory=dict, description="the schedule's own arguments")
    ddim_sampling_eta: float = Field(0.0, ge=0)
    auto_normalize: bool = True
    offset_noise_strength: float = 0.0
    min_snr_loss_weight: bool = False
    min_snr_gamma: float = 5.0
    immiscible: bool = False


def refuse(field: str, value: Any, why: str) -> GenzooError:
    return GenzooError(
        f"GaussianDiffusion field '{field}' = {value!r}: {why}; genzoo cannot represent it exactly, so it is not "
        "imported"
    )


def library_betas(schedule: str, timesteps: int, kwargs: dict[str, float]) -> np.ndarray:
    """The float64 betas GaussianDiffusion computes (its own schedule functions)."""
    from denoising_diffusion_pytorch import denoising_diffusion_pytorch as ddp

    fn = getattr(ddp, f"{schedule}_beta_schedule")
    try:
        return fn(timesteps, **kwargs).numpy()
    except TypeError as e:
        raise refuse("schedule_fn_kwargs", kwargs, f"the {schedule} schedule does not take them ({e})") from None


def loss_weight(betas: np.ndarray, objective: str, args: DiffusionArgs) -> torch.Tensor:
    """GaussianDiffusion's float32 ``loss_weight`` buffer for ``objective`` (Hang et al.'s min-SNR clamp optional)."""
    abar = torch.cumprod(1.0 - torch.as_tensor(betas), dim=0)
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=args.min_snr_gamma) if args.min_snr_loss_weight else snr
    weight = {"pred_noise": clipped / snr, "pred_x0": clipped, "pred_v": clipped / (snr + 1)}[objective]
    return weight.float()


def schedule_of(args: DiffusionArgs, buffers: dict[str, torch.Tensor]) -> tuple[str, int, np.ndarray]:
    """(schedule name, T, float64 betas): the given ones, checked against the checkpoint's float32 ``betas``; or the
    library schedule that reproduces them."""
    stored = buffers.get("betas")
    if args.timesteps is not None and stored is not None and len(stored) != args.timesteps:
        raise refuse("timesteps", args.timesteps, f"the checkpoint's betas hold {len(stored)} steps")
    t = args.timesteps or (len(stored) if stored is not None else 1000)
    if args.beta_schedule or stored is None:
        name = args.beta_schedule or "sigmoid"
        betas = library_betas(name, t, args.schedule_fn_kwargs)
        if stored is None or torch.equal(torch.as_tensor(betas).float(), stored.float()):
            return name, t, betas
    else:
        for name in SCHEDULES:
            try:
                betas = library_betas(name, t, args.schedule_fn_kwargs)
            except GenzooError:  # the kwargs belong to another schedule
                continue
            if torch.equal(torch.as_tensor(betas).float(), stored.float()):
                return name, t, betas
    if args.beta_schedule:
        raise refuse(
            "beta_schedule",
            args.beta_schedule,
            f"the checkpoint's betas are not its {args.beta_schedule} schedule over {t} steps with "
            f"{args.schedule_fn_kwargs or 'its default arguments'}; give the schedule_fn_kwargs it was trained with",
        )
    raise refuse(
        "beta_schedule", None, "the checkpoint's betas are none of linear, cosine, sigmoid at their defaults; name it"
    )


def objective_of(args: DiffusionArgs, betas: np.ndarray, buffers: dict[str, torch.Tensor]) -> str:
    """The objective given, checked against the checkpoint's ``loss_weight``; or the one that reproduces it."""
    stored = buffers.get("loss_weight")
    if stored is None:
        return args.objective or "pred_v"
    found = [
        o
        for o in MEAN
        if torch.allclose(loss_weight(betas, o, args), stored.float(), rtol=1e-5, atol=0, equal_nan=True)
    ]
    if args.objective is not None and args.objective not in found:
        raise refuse(
            "objective",
            args.objective,
            "the checkpoint's loss_weight is not that objective's "
            f"(min_snr_loss_weight {args.min_snr_loss_weight}); it matches {found or 'none'}",
        )
    if args.objective is None and len(found) != 1:
        raise refuse("objective", None, f"the checkpoint's loss_weight matches {found or 'no objective'}; name it")
    return args.objective or found[0]


def ddim_grid(timesteps: int, steps: int) -> list[int]:
    """The timesteps ``ddim_sample`` evaluates the network at, ascending: linspace(-1, T - 1, S + 1), truncated."""
    times = torch.linspace(-1, timesteps - 1, steps=steps + 1).int().tolist()
    return sorted(t for t in times if t >= 0)


def ddim_spacing(timesteps: int, steps: int) -> dict[str, Any] | None:
    """The genzoo sampler spacing whose grid is ``ddim_grid``, or None."""
    grid = set(ddim_grid(timesteps, steps))
    if len(grid) != steps:
        return None
    if space_timesteps(timesteps, steps) == grid:
        return {"spacing": "even", "steps_offset": 0}
    offset = min(grid)
    try:
        if spaced_grid(timesteps, steps, "leading", offset) == grid:
            return {"spacing": "leading", "steps_offset": offset}
    except ValueError:
        pass
    return None


def map_diffusion(args: DiffusionArgs, buffers: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(diffusion decoder fields, sampler spec, what was inferred) for ``args`` and the checkpoint's buffers."""
    size = args.image_size
    if isinstance(size, list):
        if len(size) != 2 or size[0] != size[1]:
            raise refuse("image_size", size, "genzoo's images are square")
        size = size[0]
    if not args.auto_normalize:
        raise refuse(
            "auto_normalize",
            False,
            "its Trainer then feeds [0, 1] images while sampling clamps x0_hat to [-1, 1]; genzoo's images are "
            "[-1, 1], which is what auto_normalize true maps [0, 1] to",
        )
    schedule, t, betas = schedule_of(args, buffers)
    objective = objective_of(args, betas, buffers)
    # its linear and cosine betas differ from genzoo's by float64 rounding (1e-16): the named schedule then
    named = schedule != "sigmoid" and np.allclose(betas, get_named_beta_schedule(schedule, t), rtol=1e-12, atol=0)
    decoder: dict[str, Any] = {"timesteps": t, **({"schedule": schedule} if named else {"betas": betas.tolist()})}
    decoder.update(mean_type=MEAN[objective], var_type="fixed-small", loss="simple", clip_range=1.0)
    steps = args.sampling_timesteps or t
    if steps > t:
        raise refuse("sampling_timesteps", steps, f"GaussianDiffusion takes at most timesteps = {t}")
    if steps == t:  # p_sample_loop: ancestral, every timestep
        sampler: dict[str, Any] = {"type": "ddpm", "steps": t}
    else:
        spacing = ddim_spacing(t, steps)
        if spacing is None:
            raise refuse(
                "sampling_timesteps",
                steps,
                f"ddim_sample's grid linspace(-1, {t - 1}, {steps + 1}) truncated is {ddim_grid(t, steps)[:4]}..., "
                "which no genzoo spacing steps along (it is 'leading' when sampling_timesteps divides timesteps)",
            )
        sampler = {"type": "ddim", "steps": steps, **spacing, "eta": args.ddim_sampling_eta, "clipped_eps": True}
    inferred = {"beta_schedule": schedule, "timesteps": t, "objective": objective, "image_size": size}
    return decoder, sampler, inferred
