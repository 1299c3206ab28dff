"""Diffusion samplers: ancestral DDPM, DDIM, DPM-Solver++(2M). Any denoiser, any tensor shape.

Each sampler respaces the process to its own steps (Improved DDPM Sec. 4; the network still sees
original timestep indices), so running fewer steps than the model was trained with is always a
respaced run, never a truncated one. A step evaluates the model through its guidance
(``model_output``, then ``p_mean_variance``, then ``condition_mean`` or ``condition_eps``) and never
looks at the guidance's type. Loops run under ``no_grad`` (gradient guidances turn autograd on
locally) with no host-device sync.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from tqdm.auto import tqdm

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, Model, Prediction
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.schedules import FAST27, solver_grid, space_timesteps, spaced_grid
from genzoo.interfaces import Condition, Sampler, SamplerKind
from genzoo.registry import component


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int | str = Field(
        50,
        description="model evaluations, or a respacing string of the grid: '10,10,3' (per equal section), "
        "'ddim50' (uniform stride), 'fast27' (GLIDE's upsampler)",
    )
    clip: bool = Field(
        True, description="clamp x0_hat to the process's clip_range (images in [-1, 1]); no effect when it is None"
    )
    threshold: float | None = Field(
        None,
        gt=0.5,
        le=1,
        description="dynamic thresholding percentile p (Imagen, e.g. 0.995) instead of the plain clamp; None: off",
    )
    spacing: Literal["even", "leading", "trailing", "linspace"] = Field(
        "even",
        description="grid of integer steps: even (first and last timestep kept), or diffusers' "
        "timestep_spacing leading / trailing / linspace (genzoo.diffusion.schedules.spaced_grid)",
    )
    steps_offset: int = Field(
        0, ge=0, description="added to every timestep of the leading spacing (diffusers' steps_offset)"
    )
    grid: Literal["uniform", "quadratic", "log-snr", "karras"] = Field(
        "uniform",
        description="which timesteps the solver steps on: uniform in t (space_timesteps), quadratic in t, "
        "uniform in log-SNR, or Karras et al.'s sigma grid (genzoo.diffusion.schedules.solver_grid)",
    )
    rho: float = Field(7.0, gt=0, description="the karras grid's exponent (EDM's rho; 1 is uniform in sigma)")
    sigma_max: float | None = Field(
        80.0,
        gt=0,
        description="karras and log-snr grids: the noisiest target sigma = sqrt((1 - abar) / abar) when t = T "
        "is noisier (the chain still starts at t = T); None: sigma_T",
    )

    @model_validator(mode="after")
    def _grid_takes_even_integer_steps(self) -> SamplerConfig:
        if self.grid != "uniform" and self.spacing != "even":
            raise ValueError(
                f"sampler grid '{self.grid}' picks its own timesteps, so spacing must be 'even' (got "
                f"'{self.spacing}'); spacing applies to the uniform grid only"
            )
        if self.grid != "uniform" and not (isinstance(self.steps, int) or self.steps.isdigit()):
            raise ValueError(f"sampler grid '{self.grid}' takes an integer number of steps, not steps={self.steps!r}")
        return self


def randn(
    shape: tuple[int, ...],
    x_like: Tensor | None,
    *,
    generator: torch.Generator | None,
    device: Any = None,
    dtype: Any = None,
) -> Tensor:
    """Normal noise drawn on the generator's device (reproducible across devices), placed with ``x_like``."""
    device = x_like.device if x_like is not None else device
    dtype = x_like.dtype if x_like is not None else dtype
    z = torch.randn(
        shape, generator=generator, device=generator.device if generator is not None else device, dtype=dtype
    )
    return z.to(device)


class DiffusionSampler(Sampler):
    """Base: respacing, the step loop, x0_hat processing. A subclass implements ``step``.

    ``last_index`` is the smallest grid index the model is evaluated at: 0 for samplers whose last
    step is a model step, 1 for those that jump from grid index 1 straight to x0_hat.
    """

    kind = SamplerKind.DIFFUSION
    Config = SamplerConfig
    last_index = 0

    def __init__(self, cfg: SamplerConfig) -> None:
        self.cfg = cfg
        self._respaced: dict[tuple[int, int | str], tuple[GaussianDiffusion, GaussianDiffusion]] = {}

    def grid(self) -> int | str:
        """The respacing of the process: ``steps`` model evaluations plus ``last_index`` grid points."""
        steps = self.cfg.steps
        return int(steps) + self.last_index if isinstance(steps, int) or steps.isdigit() else steps

    def nfe(self) -> int:
        grid = self.grid()
        if isinstance(grid, int):
            return grid - self.last_index
        sections = FAST27 if grid == "fast27" else grid
        count = int(grid[4:]) if grid.startswith("ddim") else sum(int(s) for s in sections.split(","))
        return count - self.last_index

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        """The process on this sampler's grid, built once per (process, steps)."""
        key = (id(diffusion), self.cfg.steps)
        hit = self._respaced.get(key)
        if hit is None or hit[0] is not diffusion:  # the process is kept in the value, so its id cannot be reused
            grid = self.grid()
            if isinstance(grid, int) and grid > diffusion.num_timesteps:
                raise ValueError(
                    f"sampler steps={self.cfg.steps} needs {grid} timesteps but the model has "
                    f"{diffusion.num_timesteps}; use fewer steps"
                )
            if self.cfg.grid != "uniform":  # an integer count and even spacing (SamplerConfig checks both)
                kept = solver_grid(diffusion.tables["abar"], int(grid), self.cfg.grid, self.cfg.rho, self.cfg.sigma_max)
            elif self.cfg.spacing == "even":
                kept = space_timesteps(diffusion.num_timesteps, grid)
            elif isinstance(grid, int):
                kept = spaced_grid(diffusion.num_timesteps, grid, self.cfg.spacing, self.cfg.steps_offset)
            else:
                raise ValueError(f"sampler spacing '{self.cfg.spacing}' takes an integer number of steps, not {grid!r}")
            if (
                not kept or max(kept) < diffusion.num_timesteps // 2
            ):  # one section of one step keeps only t = 1 (as improved-diffusion)
                start = f"starts the chain at t = {max(kept) + 1}" if kept else "keeps no step"
                raise ValueError(
                    f"sampler steps={self.cfg.steps!r} {start} of {diffusion.num_timesteps}, but x_T is pure "
                    "noise; use steps >= 2 (in every section of a '10,10,3' string)"
                )
            hit = (diffusion, diffusion.respace(kept))
            self._respaced[key] = hit
        return hit[1]

    def process_xstart(self, diffusion: GaussianDiffusion) -> Callable[[Tensor], Tensor] | None:
        """Clamp x0_hat to the data range, or Imagen's dynamic thresholding (Saharia et al. 2022, Sec. 2.3)."""
        c = diffusion.clip_range
        if c is None or not self.cfg.clip:
            return None
        if self.cfg.threshold is None:
            return lambda x0: x0.clamp(-c, c)
        p = self.cfg.threshold

        def dynamic(x0: Tensor) -> Tensor:
            # s = the p-quantile of |x0| per sample, at least the data range: saturated pixels are pushed inward
            s = torch.quantile(x0.flatten(1).abs().float(), p, dim=1).clamp(min=c).to(x0.dtype)
            s = s.view(-1, *([1] * (x0.dim() - 1)))
            return x0.clamp(-s, s) / s * c

        return dynamic

    def predict(
        self,
        proc: GaussianDiffusion,
        net: Model,
        x: Tensor,
        t: Tensor,
        cond: Condition | None,
        guidance: DiffusionGuidance,
        *,
        eps_form: bool = False,
    ) -> Prediction:
        """The reverse step at (x, t) as the guidance shapes the model's output; ``eps_form``: with the guidance's
        eps-form shift as well (DDIM, DPM-Solver++). A guided x0_hat is then post-processed again, as the unguided
        one was: the shift (1 - abar)/sqrt(abar) s grad is ~100 per pixel at t = T of the cosine schedule
        (abar_T = 2.4e-9, docs/text.md), which unclamped ruins the sample."""
        process = self.process_xstart(proc)
        pred = proc.p_mean_variance(guidance.model_output(net, x, t, cond), x, t, process_xstart=process)
        if not eps_form:
            return pred
        guided = guidance.condition_eps(proc, pred, x, t, cond)
        if guided is pred:  # unguided, or guidance in the model output (CFG): already processed
            return pred
        return guided if process is None else proc.prediction_from_xstart(guided, x, t, process(guided.pred_xstart))

    @torch.no_grad()
    def sample(
        self,
        diffusion: GaussianDiffusion,
        model: Model,
        shape: tuple[int, ...],
        *,
        cond: Condition | None = None,
        guidance: DiffusionGuidance | None = None,
        generator: torch.Generator | None = None,
        noise: Tensor | None = None,
        device: torch.device | str | None = None,
        progress: bool = False,
    ) -> Tensor:
        """x_0 of ``shape`` from ``noise`` (x_T), or from fresh noise on ``device`` (default: the model's)."""
        top = self.respaced(diffusion).num_timesteps - 1
        guidance = guidance if guidance is not None else DiffusionGuidance()
        if noise is None:
            params = next(model.parameters(), None) if isinstance(model, nn.Module) else None
            device = device if device is not None else (params.device if params is not None else None)
            noise = randn(tuple(shape), None, generator=generator, device=device, dtype=torch.get_default_dtype())
        path = [*range(top, self.last_index - 1, -1), -1]  # down the grid to x_0
        return run_chain(
            self, diffusion, model, noise, path, cond=cond, guidance=guidance, generator=generator, progress=progress
        )

    def start(self, diffusion: GaussianDiffusion, model: Model) -> dict[str, Any]:
        """The ``state`` a run starts with (empty); a sampler that evaluates the model off its grid (EDM's churn)
        keeps the process and the model there."""
        return {}

    @abstractmethod
    def step(
        self,
        proc: GaussianDiffusion,
        net: Model,
        x: Tensor,
        t: Tensor,
        i: int,
        *,
        cond: Condition | None,
        guidance: DiffusionGuidance,
        generator: torch.Generator | None,
        state: dict[str, Any],
    ) -> Tensor:
        """x at grid index i -> x at i - 1 (x_0 after the last step); ``state`` carries history between steps."""


def forward_step(diffusion: GaussianDiffusion, x: Tensor, i: int, *, generator: torch.Generator | None) -> Tensor:
    """x at grid index i from x at i - 1 by the forward kernel q(x_i | x_{i-1}) = N(sqrt(1 - b_i) x, b_i I) of the
    (respaced) process (RePaint Alg. 1, line 9)."""
    beta = float(diffusion.tables["betas"][i])
    return math.sqrt(1 - beta) * x + math.sqrt(beta) * randn(x.shape, x, generator=generator)


@torch.no_grad()
def run_chain(
    sampler: DiffusionSampler,
    diffusion: GaussianDiffusion,
    model: Model,
    x: Tensor,
    path: list[int],
    *,
    cond: Condition | None,
    guidance: DiffusionGuidance,
    generator: torch.Generator | None,
    project: Any = None,
    progress: bool = False,
) -> Tensor:
    """Walk the grid indices ``path`` of ``sampler``'s process from x at path[0]: a step down is the sampler's own
    ``step`` (then the guidance's ``after_step`` and ``project(proc, x, i)``), a step up the forward kernel. Sampling
    walks straight down to -1 (x_0); editing jumps back up (RePaint) and starts part way (SDEdit).

    A sampler that keeps a history in ``state`` (DPM-Solver++(2M), (3M), UniPC) starts a new one after every jump up,
    so its first step after a jump is first order.
    """
    proc = sampler.respaced(diffusion)
    net = proc.wrap(model)
    state = sampler.start(diffusion, model)
    for here, there in tqdm(list(zip(path, path[1:])), disable=not progress, leave=False):
        if there > here:
            x = forward_step(proc, x, there, generator=generator)
            state = sampler.start(diffusion, model)
            continue
        t = torch.full((x.shape[0],), here, device=x.device, dtype=torch.long)
        x = sampler.step(proc, net, x, t, here, cond=cond, guidance=guidance, generator=generator, state=state)
        x = guidance.after_step(proc, x, there, cond)
        if project is not None:
            x = project(proc, x, there)
    return x


@component("sampler", "ddpm", config=SamplerConfig)
class AncestralSampler(DiffusionSampler):
    """x_{t-1} = mu + sigma z, no noise at the last step (DDPM Alg. 2, on the respaced process)."""

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = guidance.condition_mean(proc, self.predict(proc, net, x, t, cond, guidance), x, t, cond)
        if i == 0:
            return pred.mean
        return pred.mean + torch.exp(0.5 * pred.log_variance) * randn(x.shape, x, generator=generator)


class DDIMConfig(SamplerConfig):
    eta: float = Field(
        0.0, ge=0, description="0: deterministic DDIM; 1: the ancestral fixed-small noise (Song et al. 2021, Eq. 16)"
    )
    clipped_eps: bool = Field(
        True,
        description="step with eps recomputed from the clamped x0_hat (improved-diffusion; diffusers' "
        "use_clipped_model_output=True); False: the model's own eps (diffusers' default)",
    )


@component("sampler", "ddim", config=DDIMConfig)
class DDIMSampler(DiffusionSampler):
    """x' = sqrt(abar') x0_hat + sqrt(1 - abar' - sigma^2) eps_hat + sigma z (Song et al. 2021, Eq. 12).

    abar' is the next grid point's (abar_prev of the respaced process, 1 after the last step);
    sigma = eta sqrt((1 - abar') / (1 - abar)) sqrt(1 - abar / abar') (Eq. 16).
    """

    Config = DDIMConfig

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = self.predict(proc, net, x, t, cond, guidance, eps_form=True)
        abar, abar_prev = proc.extract("abar", t, x), proc.extract("abar_prev", t, x)
        sigma = self.cfg.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        eps = pred.pred_eps if self.cfg.clipped_eps else pred.model_eps
        x = abar_prev.sqrt() * pred.pred_xstart + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * eps
        if self.cfg.eta > 0 and i > 0:
            x = x + sigma * randn(x.shape, x, generator=generator)
        return x


@component("sampler", "dpm-solver++", config=SamplerConfig)
class DPMSolverPlusPlus2M(DiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, second order, in lambda = log(alpha / sigma).

    With data prediction D = x0_hat and h_i = lambda_i - lambda_{i-1}:
    x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D', where D' = D_{i-1} on the first
    step and (1 + 1/(2r)) D_{i-1} - 1/(2r) D_{i-2} after, r = h_{i-1} / h_i.

    Grid: ``steps + 1`` points of the respaced process, uniform in t (``space_timesteps``), not in
    lambda. The model is evaluated at all but the last point; the last step goes from the smallest
    t > 0 straight to sigma = 0 at first order and returns x0_hat (diffusers' ``final_sigmas_type=
    "zero"``, ``lower_order_final``): spending an evaluation at t = 0 instead, where lambda jumps by
    several units, doubled the covariance error on the closed-form mixture test.
    """

    last_index = 1

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = self.predict(proc, net, x, t, cond, guidance, eps_form=True)
        d = pred.pred_xstart
        if i == self.last_index:
            return d
        abar, abar_next = proc.extract("abar", t, x), proc.extract("abar_prev", t, x)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        alpha_next, sigma_next = abar_next.sqrt(), (1 - abar_next).sqrt()
        h = torch.log(alpha_next / sigma_next) - torch.log(alpha / sigma)
        if "d_prev" in state:
            r = state["h_prev"] / h
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * state["d_prev"]
        else:
            d_used = d
        state["d_prev"], state["h_prev"] = d, h
        return (sigma_next / sigma) * x - alpha_next * torch.expm1(-h) * d_used
