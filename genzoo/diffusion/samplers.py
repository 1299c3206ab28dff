"""Diffusion samplers: ancestral DDPM (respaced), DDIM, DPM-Solver++(2M). Any denoiser, any tensor shape.

Each sampler respaces the process to its own number of steps (the network still sees original
timestep indices), evaluates the model through its guidance, and never looks at the guidance's
type. Loops run under ``no_grad`` (gradient guidances enable grad locally) with no host sync.
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor
from tqdm.auto import tqdm

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion, Model, Prediction
from genzoo.diffusion.guidance import DiffusionGuidance
from genzoo.diffusion.schedules import space_timesteps
from genzoo.interfaces import Condition, Sampler, SamplerKind


class SamplerConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int | str = Field(50, description="number of steps, or a respacing string ('10,10,3', 'ddim50')")
    clip: bool = Field(True, description="clamp x0_hat to the process's clip range (for images in [-1, 1])")
    threshold: float | None = Field(None, gt=0.5, le=1, description="dynamic thresholding percentile (Imagen, e.g. 0.995); None: off")


class DiffusionSampler(Sampler):
    """Base: respacing, the step loop, x0 processing; subclasses implement ``step``."""

    kind = SamplerKind.DIFFUSION
    Config = SamplerConfig
    last_index = 0  # the last grid index the model is evaluated at

    def __init__(self, cfg: SamplerConfig) -> None:
        self.cfg = cfg
        self._respaced: dict[int, tuple[GaussianDiffusion, GaussianDiffusion]] = {}

    def respaced(self, diffusion: GaussianDiffusion) -> GaussianDiffusion:
        """The process on this sampler's steps, cached per process."""
        hit = self._respaced.get(id(diffusion))
        if hit is None or hit[0] is not diffusion:
            steps = self.cfg.steps
            if isinstance(steps, int) or str(steps).isdigit():
                steps = int(steps) + self.last_index
                if steps > diffusion.num_timesteps:
                    raise ValueError(f"sampler steps={steps} exceeds the model's {diffusion.num_timesteps} timesteps")
            hit = (diffusion, diffusion.respace(space_timesteps(diffusion.num_timesteps, steps)))
            self._respaced[id(diffusion)] = hit
        return hit[1]

    def nfe(self) -> int:
        steps = self.cfg.steps
        if isinstance(steps, str) and not steps.isdigit():
            return int(steps[4:]) if steps.startswith("ddim") else sum(int(s) for s in steps.split(","))
        return int(steps)

    def process_xstart(self, diffusion: GaussianDiffusion) -> Callable[[Tensor], Tensor] | None:
        c = diffusion.clip_range
        if c is None or not self.cfg.clip:
            return None
        if self.cfg.threshold is None:
            return lambda x0: x0.clamp(-c, c)
        p = self.cfg.threshold

        def dynamic(x0: Tensor) -> Tensor:  # Imagen (Saharia et al. 2022), Sec. 2.3
            s = torch.quantile(x0.flatten(1).abs().float(), p, dim=1).clamp(min=c).to(x0.dtype)
            s = s.view(-1, *([1] * (x0.dim() - 1)))
            return x0.clamp(-s, s) / s * c

        return dynamic

    def predict(self, proc: GaussianDiffusion, net: Model, x: Tensor, t: Tensor, cond, guidance: DiffusionGuidance) -> Prediction:
        out = guidance.model_output(net, x, t, cond)
        return proc.p_mean_variance(out, x, t, process_xstart=self.process_xstart(proc))

    @torch.no_grad()
    def sample(
        self, diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...], *, cond: Condition | None = None,
        guidance: DiffusionGuidance | None = None, generator: torch.Generator | None = None, noise: Tensor | None = None,
        device: torch.device | str | None = None, progress: bool = False,
    ) -> Tensor:
        """Draw x_0 of ``shape`` starting from ``noise`` (x_T), or fresh noise from ``generator``."""
        proc = self.respaced(diffusion)
        guidance = guidance or DiffusionGuidance()
        net = proc.wrap(model)
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=device)
        state: dict = {}
        steps = list(reversed(range(self.last_index, proc.num_timesteps)))
        for i in tqdm(steps, disable=not progress, leave=False):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.step(proc, net, x, t, i, cond=cond, guidance=guidance, generator=generator, state=state)
        return x

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state) -> Tensor:
        raise NotImplementedError


class AncestralSampler(DiffusionSampler):
    """x_{t-1} = mu + sigma z, no noise at the last step (DDPM Alg. 2, on the respaced process)."""

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = guidance.condition_mean(proc, self.predict(proc, net, x, t, cond, guidance), x, t, cond)
        if i == 0:
            return pred.mean
        z = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return pred.mean + torch.exp(0.5 * pred.log_variance) * z


class DDIMConfig(SamplerConfig):
    eta: float = Field(0.0, ge=0, description="0: deterministic DDIM; 1: DDPM-like noise (Song et al. 2021, Eq. 16)")


class DDIMSampler(DiffusionSampler):
    """x' = sqrt(abar') x0 + sqrt(1 - abar' - sigma^2) eps + sigma z (Song et al. 2021, Eq. 12)."""

    Config = DDIMConfig

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = guidance.condition_eps(proc, self.predict(proc, net, x, t, cond, guidance), x, t, cond)
        abar, abar_prev = proc.extract("abar", t, x), proc.extract("abar_prev", t, x)
        sigma = self.cfg.eta * ((1 - abar_prev) / (1 - abar)).sqrt() * (1 - abar / abar_prev).sqrt()
        x = abar_prev.sqrt() * pred.pred_xstart + (1 - abar_prev - sigma**2).clamp(min=0).sqrt() * pred.pred_eps
        if self.cfg.eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return x


class DPMSolverPlusPlus2M(DiffusionSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, second order in lambda = log(alpha / sigma).

    The grid is ``steps + 1`` respaced points; the model is evaluated at all but t = 0, and the
    last step goes from the smallest t > 0 straight to sigma = 0 at first order (it returns x0_hat),
    as diffusers' ``final_sigmas_type="zero"``. Spending an evaluation at t = 0 instead (where
    lambda jumps by several units) doubles the covariance error on the closed-form mixture test.
    The first step is first order too (no history).
    """

    last_index = 1

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = guidance.condition_eps(proc, self.predict(proc, net, x, t, cond, guidance), x, t, cond)
        d = pred.pred_xstart
        if i == self.last_index:
            return d
        abar, abar_prev = proc.extract("abar", t, x), proc.extract("abar_prev", t, x)
        alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
        alpha_next, sigma_next = abar_prev.sqrt(), (1 - abar_prev).sqrt()
        lam, lam_next = torch.log(alpha / sigma), torch.log(alpha_next / sigma_next)
        h = lam_next - lam
        if "d_prev" in state:
            r = state["h_prev"] / h
            d_used = (1 + 1 / (2 * r)) * d - (1 / (2 * r)) * state["d_prev"]
        else:
            d_used = d
        state["d_prev"], state["h_prev"] = d, h
        return (sigma_next / sigma) * x - alpha_next * torch.expm1(-h) * d_used


SAMPLERS = {"ddpm": AncestralSampler, "ddim": DDIMSampler, "dpm-solver++": DPMSolverPlusPlus2M}
