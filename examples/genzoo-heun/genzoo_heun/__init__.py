"""A third-party genzoo plugin: Heun's sampler (Karras et al. 2022, Alg. 1) on the discrete process.

In sigma-space, x~ = x_t / sqrt(abar_t) and sigma_t = sqrt((1 - abar_t) / abar_t), the probability
flow ODE is dx~/dsigma = eps(x_t, t). Heun takes an Euler step then corrects it with the slope at
the end point: second order, two model evaluations per step (one on the last step to sigma = 0).
"""

from __future__ import annotations

from genzoo.diffusion.samplers import DiffusionSampler, SamplerConfig
from genzoo.plugins import hookimpl

__version__ = "0.1.0"


class HeunConfig(SamplerConfig):
    """Heun takes the common diffusion sampler settings (steps, clip, threshold)."""


class HeunSampler(DiffusionSampler):
    Config = HeunConfig
    last_index = 1  # the last step goes from the smallest t > 0 straight to sigma = 0

    def nfe(self) -> int:
        return 2 * super().nfe() - 1

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        pred = guidance.condition_eps(proc, self.predict(proc, net, x, t, cond, guidance), x, t, cond)
        if i == self.last_index:
            return pred.pred_xstart
        abar, abar_next = proc.extract("abar", t, x), proc.extract("abar_prev", t, x)
        sigma, sigma_next = ((1 - abar) / abar).sqrt(), ((1 - abar_next) / abar_next).sqrt()
        x_tilde = x / abar.sqrt()
        euler = (x_tilde + (sigma_next - sigma) * pred.pred_eps) * abar_next.sqrt()
        pred_next = guidance.condition_eps(
            proc, self.predict(proc, net, euler, t - 1, cond, guidance), euler, t - 1, cond
        )
        slope = 0.5 * (pred.pred_eps + pred_next.pred_eps)
        return (x_tilde + (sigma_next - sigma) * slope) * abar_next.sqrt()


@hookimpl
def register_components(registry) -> None:
    registry.register("sampler", "heun", config=HeunConfig, factory=HeunSampler)
