"""A diffusers scheduler config as genzoo's Gaussian process (the diffusion decoder's fields) and sampler.

| diffusers | genzoo |
|---|---|
| ``beta_schedule`` linear / squaredcos_cap_v2 | ``schedule`` linear / cosine where they coincide in float64 |
| ``beta_schedule`` scaled_linear, sigmoid, laplace; ``trained_betas`` | explicit ``betas``: diffusers' float32 values |
| ``prediction_type`` epsilon / sample / v_prediction | ``mean_type`` eps / x0 / v |
| ``variance_type`` fixed_small(_log), fixed_large, learned_range | ``var_type`` the same, kebab-case |
| ``clip_sample``, ``clip_sample_range`` | ``clip_range`` (None when off) |
| ``thresholding`` with ``sample_max_value`` 1 | ``clip_range`` 1 (diffusers clamps the threshold to [1, 1]) |
| ``timestep_spacing``, ``steps_offset`` | the sampler's ``spacing``, ``steps_offset`` |
| DDIM's ``use_clipped_model_output`` (pipeline default False) | the ddim sampler's ``clipped_eps`` |
| float32 ``alphas_cumprod`` | ``abar_float32: true`` |

Refused, each with its field named: ``rescale_betas_zero_snr``, ``variance_type`` learned / fixed_large_log,
``thresholding`` with ``sample_max_value`` != 1, DDIM's ``set_alpha_to_one`` False, DDPM's ``steps_offset`` > 0
(its last step then adds noise), and spacings whose grid diffusers does not step along (``spaced_grid``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from genzoo.diffusion.schedules import get_named_beta_schedule, space_timesteps, spaced_grid
from genzoo.errors import GenzooError

MEAN = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
VAR = {
    "fixed_small": "fixed-small",
    "fixed_small_log": "fixed-small",
    "fixed_large": "fixed-large",
    "learned_range": "learned-range",
}
SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")


class SchedulerError(GenzooError):
    """A scheduler setting genzoo's process or samplers cannot reproduce exactly."""


def _refuse(field: str, value: Any, why: str) -> SchedulerError:
    return SchedulerError(
        f"scheduler field '{field}' = {value!r}: {why}; genzoo cannot represent it exactly, so it is not imported"
    )


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``squaredcos_cap_v2`` (``betas_for_alpha_bar``), in float64."""
    f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return np.array(
        [min(1 - f((i + 1) / num_timesteps) / f(i / num_timesteps), max_beta) for i in range(num_timesteps)]
    )


def process_fields(cfg: Mapping[str, Any], scheduler: Any) -> dict[str, Any]:
    """The diffusion decoder's fields (schedule or betas, T, mean, variance, clipping) for a full scheduler config."""
    t = int(cfg["num_train_timesteps"])
    out: dict[str, Any] = {
        "timesteps": t,
        "abar_float32": True,
    }  # diffusers' float32 tables (schedules.betas_with_float32_abar)
    if cfg.get("rescale_betas_zero_snr"):
        raise _refuse(
            "rescale_betas_zero_snr", True, "a zero terminal SNR makes abar_T = 0, where genzoo's x0_hat is undefined"
        )
    schedule, named = cfg.get("beta_schedule"), None
    if cfg.get("trained_betas") is None and schedule == "linear":
        if np.array_equal(
            np.linspace(cfg["beta_start"], cfg["beta_end"], t, dtype=np.float64), get_named_beta_schedule("linear", t)
        ):
            named = "linear"
    elif cfg.get("trained_betas") is None and schedule == "squaredcos_cap_v2":
        if np.allclose(cosine_betas(t), get_named_beta_schedule("cosine", t), rtol=1e-12, atol=0):
            named = "cosine"
    if named is not None:
        out["schedule"] = named
    else:  # the betas diffusers runs with (float32 values): trained, scaled_linear, sigmoid, ..., other linear ranges
        out["betas"] = [float(b) for b in scheduler.betas.double().numpy()]
    pred = cfg.get("prediction_type", "epsilon")
    if pred not in MEAN:
        raise _refuse("prediction_type", pred, f"genzoo predicts {', '.join(MEAN)}")
    out["mean_type"] = MEAN[pred]
    var = cfg.get("variance_type", "fixed_small")
    if var not in VAR:
        raise _refuse("variance_type", var, f"genzoo's variances are {', '.join(VAR)}")
    out["var_type"] = VAR[var]
    if var == "learned_range":
        out["loss"] = "hybrid"  # Improved DDPM trains the range through L_vlb (genzoo requires it of learned-range)
    if cfg.get("thresholding"):
        if float(cfg.get("sample_max_value", 1.0)) != 1.0:
            raise _refuse(
                "thresholding",
                True,
                f"dynamic thresholding with sample_max_value {cfg['sample_max_value']} caps the "
                "threshold, which genzoo's sampler threshold does not",
            )
        out["clip_range"] = 1.0  # the threshold is clamped to [1, 1]: a clamp to [-1, 1]
    else:
        out["clip_range"] = float(cfg["clip_sample_range"]) if cfg.get("clip_sample") else None
    return out


def map_scheduler(
    class_name: str, raw: Mapping[str, Any], *, ddim: bool, steps: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoder fields, sampler spec) for a scheduler config run by a DDIM (``ddim``) or DDPM pipeline for ``steps``."""
    import diffusers

    if class_name not in SCHEDULERS:
        raise SchedulerError(
            f"scheduler class {class_name} is not imported (genzoo reproduces {', '.join(SCHEDULERS)})"
        )
    cls = diffusers.DDIMScheduler if ddim else getattr(diffusers, class_name)
    try:
        scheduler = cls.from_config(dict(raw))  # what the diffusers pipeline itself runs, every default filled
    except (NotImplementedError, ValueError, TypeError) as e:
        raise SchedulerError(
            f"diffusers cannot build {cls.__name__} from the scheduler config: {e}".splitlines()[0]
        ) from e
    cfg = dict(scheduler.config)
    if ddim and "variance_type" in raw:  # DDIM ignores it; the process keeps it for the ancestral sampler
        cfg["variance_type"] = raw["variance_type"]
    decoder = process_fields(cfg, scheduler)
    spacing = cfg.get("timestep_spacing", "leading")
    offset = int(cfg.get("steps_offset", 0)) if spacing == "leading" else 0
    if ddim and not cfg.get("set_alpha_to_one", True):
        raise _refuse(
            "set_alpha_to_one", False, "its last step lands on abar_1 instead of 1, which no respaced process does"
        )
    if not ddim and offset:
        raise _refuse("steps_offset", offset, "diffusers' DDPM step then adds noise at its last step (t > 0)")
    try:
        spaced_grid(decoder["timesteps"], steps, spacing, offset)
    except ValueError as e:
        raise _refuse("timestep_spacing", spacing, str(e)) from None
    sampler: dict[str, Any] = {
        "type": "ddim" if ddim else "ddpm",
        "steps": steps,
        "spacing": spacing,
        "steps_offset": offset,
    }
    if ddim:
        sampler.update(
            eta=0.0, clipped_eps=False
        )  # DDIMPipeline's defaults: eta 0, use_clipped_model_output None (False)
    return decoder, sampler


def map_unclip_scheduler(raw: Mapping[str, Any], *, steps: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """(decoder fields, sampler spec) for an ``UnCLIPScheduler`` (Karlo's modified DDPM) run for ``steps``.

    Its step from grid point t to the next one t' (``prev_timestep``) uses beta = 1 - abar_t / abar_t', the posterior
    of the respaced process, and no noise at t = 0; its ``learned_range`` interpolates log beta and the log posterior
    variance of that pair, as Improved DDPM does. So it is genzoo's ancestral ``ddpm`` sampler on the respaced
    process. Its grid, round(k (T - 1) / (steps - 1)), is genzoo's ``even`` spacing; that is checked here.
    Its one difference, not copied: a step between neighbours (t' = t - 1) reads the stored float32 beta_t instead
    of recomputing it from abar, equal to float32 rounding.
    """
    import diffusers

    try:
        scheduler = diffusers.UnCLIPScheduler.from_config(dict(raw))
    except (NotImplementedError, ValueError, TypeError) as e:
        raise SchedulerError(
            f"diffusers cannot build UnCLIPScheduler from the scheduler config: {e}".splitlines()[0]
        ) from e
    cfg = dict(scheduler.config)
    decoder = process_fields(cfg, scheduler)
    t = decoder["timesteps"]
    if not 2 <= steps <= t:
        raise _refuse("num_inference_steps", steps, f"an UnCLIPScheduler run takes 2 to {t} steps")
    scheduler.set_timesteps(steps)
    if sorted(int(i) for i in scheduler.timesteps) != sorted(space_timesteps(t, steps)):
        raise _refuse("num_inference_steps", steps, "its grid is not genzoo's even spacing")
    return decoder, {"type": "ddpm", "steps": steps, "spacing": "even"}
