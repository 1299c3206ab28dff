"""Gaussian diffusion: the forward process, the reverse-process parameterisations, the losses.

Ho et al. 2020 (DDPM), Nichol & Dhariwal 2021 (Improved DDPM), modelled on improved-diffusion's
``gaussian_diffusion.py``. ``q_sample`` is DDPM Eq. 4, ``q_posterior_mean_variance`` Eqs. 6-7,
``p_mean_variance`` the reverse step, ``training_losses`` L_simple / L_hybrid / L_vlb. Every table
is float64 numpy, cast to the input's dtype on first use per (device, dtype) and cached, so a
sampling loop copies nothing from the host.

A model is any callable ``model(x_t, t, cond)`` whose output is shaped like ``x_t`` (twice the
channels on dim 1 when it learns the variance), called with ORIGINAL timestep indices. Nothing here
assumes images: reductions run over all non-batch dims, so (B, D) embeddings and (B, C, H, W)
images share every line.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

Model = Callable[[Tensor, Tensor, Any], Tensor]


class ModelMeanType(enum.Enum):
    """What the network predicts."""

    EPSILON = "eps"  # DDPM
    START_X = "x0"
    VELOCITY = "v"  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)


class ModelVarType(enum.Enum):
    """The reverse-step variance Sigma_t."""

    FIXED_SMALL = "fixed-small"  # btilde_t (DDPM Sec. 3.2, sigma^2 = btilde)
    FIXED_LARGE = "fixed-large"  # b_t, first entry btilde_2 (sigma^2 = beta)
    LEARNED_RANGE = "learned-range"  # Improved DDPM Eq. 15


class LossType(enum.Enum):
    SIMPLE = "simple"  # DDPM Eq. 14
    HYBRID = "hybrid"  # L_simple + 0.001 L_vlb, the vlb's mean detached (Improved DDPM Eq. 16)
    VLB = "vlb"  # L_vlb alone (Improved DDPM Sec. 3.3)


@dataclass
class Prediction:
    """The reverse step at (x_t, t): p(x_{t-1} | x_t) = N(mean, variance), plus the implied x0 and eps."""

    mean: Tensor
    variance: Tensor
    log_variance: Tensor
    pred_xstart: Tensor
    pred_eps: Tensor
    model_eps: Tensor | None = None  # eps before x0_hat was post-processed (diffusers' DDIM steps with it by default)


def mean_flat(x: Tensor) -> Tensor:
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def log_normal_bin(a: Tensor, b: Tensor) -> Tensor:
    """log(Phi(b) - Phi(a)) for a < b, exact in both tails (through log Phi), so its gradient never vanishes.

    Clamping ``Phi(b) - Phi(a)`` at 1e-12, as improved-diffusion does, zeroes the gradient of every
    pixel more than ~7 sigma from the mean: a VAE whose learned scale shrinks on the background
    then stops learning the foreground (posterior collapse). In the right tail use the mirror image.
    """
    right = a > 0
    hi, lo = torch.where(right, -a, b), torch.where(right, -b, a)
    log_hi, log_lo = torch.special.log_ndtr(hi), torch.special.log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1((log_lo - log_hi).clamp(max=-1e-12)))


def discretized_gaussian_log_likelihood(x: Tensor, *, means: Tensor, log_scales: Tensor) -> Tensor:
    """log P(bin of x) for data in [-1, 1] quantised to 256 bins, under N(means, e^(2 log_scales)) (DDPM Eq. 13).

    The edge bins extend to -inf and +inf so the 256 probabilities sum to one. The normal CDF is
    exact (``log_ndtr``) where improved-diffusion uses a tanh approximation (differences ~1e-3).
    """
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    plus, minus = inv_stdv * (centered + 1.0 / 255.0), inv_stdv * (centered - 1.0 / 255.0)
    log_cdf_plus = torch.special.log_ndtr(plus)
    log_one_minus_cdf_min = torch.special.log_ndtr(-minus)
    log_bin = log_normal_bin(minus, plus)
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_bin))


class GaussianDiffusion:
    """The process q(x_{1:T} | x_0) and the model's reverse process, for any tensor shape.

    Index i = 0..T-1 is the paper's t = i + 1. ``timestep_map[i]`` is the original index the
    network was trained with (the identity unless the process was built by ``respace``).
    """

    def __init__(
        self,
        *,
        betas: np.ndarray,
        model_mean_type: ModelMeanType,
        model_var_type: ModelVarType,
        loss_type: LossType,
        timestep_map: np.ndarray | None = None,
        clip_range: float | None = 1.0,
    ) -> None:
        self.model_mean_type, self.model_var_type, self.loss_type = model_mean_type, model_var_type, loss_type
        self.clip_range = clip_range  # the data range x0_hat is clamped to when sampling; None: unbounded
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or not ((b > 0) & (b <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.num_timesteps = len(b)
        self.timestep_map = (
            np.arange(self.num_timesteps) if timestep_map is None else np.asarray(timestep_map, dtype=np.int64)
        )
        if self.timestep_map.shape != b.shape:
            raise ValueError(f"timestep_map has {len(self.timestep_map)} entries for {len(b)} betas")
        abar = np.cumprod(1.0 - b)
        abar_prev = np.append(1.0, abar[:-1])
        post_var = b * (1.0 - abar_prev) / (1.0 - abar)
        # btilde_1 = 0: its log is clipped to log btilde_2 (Improved DDPM Sec. 3.1)
        first = post_var[1] if len(b) > 1 else b[0]
        self.tables: dict[str, np.ndarray] = {
            "betas": b,
            "abar": abar,
            "abar_prev": abar_prev,
            "sqrt_abar": np.sqrt(abar),
            "sqrt_one_minus_abar": np.sqrt(1.0 - abar),
            "sqrt_recip_abar": np.sqrt(1.0 / abar),
            "sqrt_recipm1_abar": np.sqrt(1.0 / abar - 1),
            "posterior_variance": post_var,
            "posterior_log_variance_clipped": np.log(np.append(first, post_var[1:])),
            "posterior_mean_coef1": b * np.sqrt(abar_prev) / (1.0 - abar),
            "posterior_mean_coef2": (1.0 - abar_prev) * np.sqrt(1.0 - b) / (1.0 - abar),
            "log_betas_large": np.log(np.append(first, b[1:])),
        }
        self._cache: dict[tuple[str, torch.device, torch.dtype], Tensor] = {}

    # ------------------------------------------------------------------ tables
    def table(self, name: str, device: torch.device, dtype: torch.dtype = torch.float64) -> Tensor:
        """A schedule table on ``device`` in ``dtype``, copied there once."""
        key = (name, torch.device(device), dtype)
        if key not in self._cache:
            src = self.timestep_map if name == "timestep_map" else self.tables[name]
            with torch.inference_mode(False):  # a table first made while sampling must still serve training
                self._cache[key] = torch.as_tensor(src).to(device=device, dtype=dtype)
        return self._cache[key]

    def extract(self, name: str, t: Tensor, x: Tensor) -> Tensor:
        """table[t] in x's dtype, shaped (B, 1, ..., 1) to broadcast against x."""
        return self.table(name, x.device, x.dtype)[t].view(-1, *([1] * (x.dim() - 1)))

    def model_t(self, t: Tensor) -> Tensor:
        """The original timestep index the network was trained with (respacing keeps it)."""
        return self.table("timestep_map", t.device, torch.long)[t]

    def wrap(self, model: Model) -> Model:
        """The model called with this process's indices, seen by the network as original indices."""
        return lambda x, t, cond: model(x, self.model_t(t), cond)

    # ------------------------------------------------------------------ forward process
    def q_mean_variance(self, x0: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t | x0) = N(sqrt(abar_t) x0, (1 - abar_t) I) (DDPM Eq. 4): mean, variance, log variance."""
        var = (1 - self.extract("abar", t, x0)).expand_as(x0)
        return self.extract("sqrt_abar", t, x0) * x0, var, torch.log(var)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor | None = None) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (DDPM Eq. 4)."""
        noise = torch.randn_like(x0) if noise is None else noise
        return self.extract("sqrt_abar", t, x0) * x0 + self.extract("sqrt_one_minus_abar", t, x0) * noise

    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_{t-1} | x_t, x0) = N(c0 x0 + ct x_t, btilde_t) (DDPM Eqs. 6-7); log variance clipped at t = 1."""
        mean = self.extract("posterior_mean_coef1", t, x_t) * x0 + self.extract("posterior_mean_coef2", t, x_t) * x_t
        var = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        return mean, var, self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)

    # ------------------------------------------------------------------ parameterisations
    def _predict_xstart_from_eps(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) (DDPM Eq. 15)."""
        return self.extract("sqrt_recip_abar", t, x_t) * x_t - self.extract("sqrt_recipm1_abar", t, x_t) * eps

    def _predict_eps_from_xstart(self, x_t: Tensor, t: Tensor, x0: Tensor) -> Tensor:
        return (self.extract("sqrt_recip_abar", t, x_t) * x_t - x0) / self.extract("sqrt_recipm1_abar", t, x_t)

    def _predict_xstart_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """x0 = sqrt(abar) x_t - sqrt(1 - abar) v (Salimans & Ho 2022, Sec. 4)."""
        return self.extract("sqrt_abar", t, x_t) * x_t - self.extract("sqrt_one_minus_abar", t, x_t) * v

    def _predict_eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        return self.extract("sqrt_one_minus_abar", t, x_t) * x_t + self.extract("sqrt_abar", t, x_t) * v

    def _predict_v(self, x0: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """v = sqrt(abar) eps - sqrt(1 - abar) x0: the VELOCITY training target."""
        return self.extract("sqrt_abar", t, x0) * eps - self.extract("sqrt_one_minus_abar", t, x0) * x0

    def split_output(self, out: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor | None]:
        """The mean part and, for a learned range, the variance part of a model output (split on dim 1)."""
        if self.model_var_type is not ModelVarType.LEARNED_RANGE:
            return out, None
        c = x_t.shape[1]
        if out.shape[1] != 2 * c:
            raise ValueError(
                f"learned-range variance needs {2 * c} output channels on dim 1 (mean and variance), got {out.shape[1]}"
            )
        return out[:, :c], out[:, c:]

    def p_mean_variance(
        self, model_output: Tensor, x_t: Tensor, t: Tensor, *, process_xstart: Callable[[Tensor], Tensor] | None = None
    ) -> Prediction:
        """p(x_{t-1} | x_t) implied by a model output: the posterior of Eq. 7 at x0_hat (DDPM Sec. 3.2).

        ``process_xstart`` post-processes x0_hat (clamping, dynamic thresholding); eps is then
        recomputed from it so that DDIM-style samplers stay consistent with the clamped x0.
        """
        out, v = self.split_output(model_output, x_t)
        if v is not None:  # Improved DDPM Eq. 15: interpolate log b_t and log btilde_t
            frac = (v + 1) / 2
            max_log, min_log = (
                torch.log(self.extract("betas", t, x_t)),
                self.extract("posterior_log_variance_clipped", t, x_t),
            )
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        elif self.model_var_type is ModelVarType.FIXED_LARGE:
            log_variance = self.extract("log_betas_large", t, x_t).expand_as(x_t)
            variance = torch.exp(log_variance)
        else:  # the exact btilde_t, 0 at t = 1 (only its log is clipped), so guidance leaves the last step alone
            log_variance = self.extract("posterior_log_variance_clipped", t, x_t).expand_as(x_t)
            variance = self.extract("posterior_variance", t, x_t).expand_as(x_t)
        if self.model_mean_type is ModelMeanType.EPSILON:
            pred_xstart = self._predict_xstart_from_eps(x_t, t, out)
        elif self.model_mean_type is ModelMeanType.START_X:
            pred_xstart = out
        else:
            pred_xstart = self._predict_xstart_from_v(x_t, t, out)
        raw_xstart = pred_xstart
        if process_xstart is not None:
            pred_xstart = process_xstart(pred_xstart)
        if self.model_mean_type is ModelMeanType.EPSILON and process_xstart is None:
            pred_eps = out
        else:
            pred_eps = self._predict_eps_from_xstart(x_t, t, pred_xstart)
        if self.model_mean_type is ModelMeanType.EPSILON:
            model_eps = out
        else:  # the eps of the unprocessed x0_hat
            model_eps = pred_eps if process_xstart is None else self._predict_eps_from_xstart(x_t, t, raw_xstart)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t, t)
        return Prediction(mean, variance, log_variance, pred_xstart, pred_eps, model_eps)

    def prediction_from_eps(self, pred: Prediction, x_t: Tensor, t: Tensor, eps: Tensor) -> Prediction:
        """``pred`` with eps replaced (guidance in the eps form): x0_hat and the mean follow, the variance stays."""
        x0 = self._predict_xstart_from_eps(x_t, t, eps)
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return replace(pred, mean=mean, pred_xstart=x0, pred_eps=eps, model_eps=eps)

    def prediction_from_xstart(self, pred: Prediction, x_t: Tensor, t: Tensor, x0: Tensor) -> Prediction:
        """``pred`` with x0_hat replaced (a guided x0_hat post-processed again): eps and the mean follow."""
        mean, _, _ = self.q_posterior_mean_variance(x0, x_t, t)
        return replace(pred, mean=mean, pred_xstart=x0, pred_eps=self._predict_eps_from_xstart(x_t, t, x0))

    # ------------------------------------------------------------------ losses
    def vb_terms_bpd(
        self,
        model_output: Tensor,
        x0: Tensor,
        x_t: Tensor,
        t: Tensor,
        *,
        process_xstart: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """L_{t-1} in bits/dim: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) for t > 1, the decoder NLL at t = 1
        (DDPM Eq. 5)."""
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, x_t, t)
        pred = self.p_mean_variance(model_output, x_t, t, process_xstart=process_xstart)
        kl = mean_flat(normal_kl(true_mean, true_logvar, pred.mean, pred.log_variance)) / math.log(2.0)
        nll = -mean_flat(
            discretized_gaussian_log_likelihood(x0, means=pred.mean, log_scales=0.5 * pred.log_variance)
        ) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(
        self, model: Model, x0: Tensor, t: Tensor, *, cond: Any = None, noise: Tensor | None = None
    ) -> dict[str, Tensor]:
        """Per-example ``loss`` (what to minimise), ``mse`` and, for HYBRID and VLB, ``vlb`` (L_t in bits/dim).

        A one-t estimate of L_vlb = sum_t L_t is T L_t, so L_hybrid = mse + 0.001 T L_t.
        """
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)
        out = self.wrap(model)(x_t, t, cond)
        mean_out, v = self.split_output(out, x_t)
        target = {ModelMeanType.EPSILON: noise, ModelMeanType.START_X: x0}.get(self.model_mean_type)
        target = self._predict_v(x0, t, noise) if target is None else target
        terms = {"mse": mean_flat((target - mean_out) ** 2)}
        if self.loss_type is LossType.SIMPLE:
            terms["loss"] = terms["mse"]
        elif self.loss_type is LossType.HYBRID:
            # stop-gradient on the mean: the vlb trains only the variance (Improved DDPM Sec. 3.1)
            frozen = mean_out.detach() if v is None else torch.cat([mean_out.detach(), v], dim=1)
            terms["vlb"] = self.vb_terms_bpd(frozen, x0, x_t, t)
            terms["loss"] = terms["mse"] + 0.001 * self.num_timesteps * terms["vlb"]
        else:
            terms["vlb"] = self.vb_terms_bpd(out, x0, x_t, t)
            terms["loss"] = self.num_timesteps * terms["vlb"]
        return terms

    def prior_bpd(self, x0: Tensor) -> Tensor:
        """L_T = KL(q(x_T | x0) || N(0, I)) in bits/dim."""
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        mean, _, logvar = self.q_mean_variance(x0, t)
        return mean_flat(normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(logvar))) / math.log(2.0)

    @torch.no_grad()
    def calc_bpd_loop(
        self, model: Model, x0: Tensor, *, cond: Any = None, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """The full-chain NLL bound in bits/dim, sum_t L_t + L_T (T model evaluations per batch).

        x0_hat is clamped to ``clip_range`` as when sampling. Returns per-example ``total_bpd``,
        ``prior_bpd`` and the terms ``vb`` (B, T).
        """
        net = self.wrap(model)
        clip = None if self.clip_range is None else (lambda x, c=self.clip_range: x.clamp(-c, c))
        vb = []
        for i in range(self.num_timesteps):
            t = torch.full((x0.shape[0],), i, device=x0.device, dtype=torch.long)
            noise = torch.randn(
                x0.shape, generator=generator, device=generator.device if generator else x0.device, dtype=x0.dtype
            )
            x_t = self.q_sample(x0, t, noise.to(x0.device))
            vb.append(self.vb_terms_bpd(net(x_t, t, cond), x0, x_t, t, process_xstart=clip))
        vb_t = torch.stack(vb, dim=1)
        prior = self.prior_bpd(x0)
        return {"total_bpd": vb_t.sum(1) + prior, "prior_bpd": prior, "vb": vb_t}

    def respace(self, use_timesteps: set[int] | list[int]) -> GaussianDiffusion:
        """The process on a subsequence S of steps: b'_i = 1 - abar_{S_i} / abar_{S_{i-1}} (Improved DDPM Sec. 4).

        ``timestep_map`` of the result holds the ORIGINAL indices, also when respacing a respaced process.
        """
        keep = sorted({int(s) for s in use_timesteps})
        if not keep or keep[0] < 0 or keep[-1] >= self.num_timesteps:
            raise ValueError(f"respacing needs timesteps in [0, {self.num_timesteps}), got {keep[:3]}...")
        abar = self.tables["abar"][keep]
        betas = 1 - abar / np.append(1.0, abar[:-1])
        return GaussianDiffusion(
            betas=betas,
            model_mean_type=self.model_mean_type,
            model_var_type=self.model_var_type,
            loss_type=self.loss_type,
            timestep_map=self.timestep_map[keep],
            clip_range=self.clip_range,
        )


# --------------------------------------------------------------------------- timestep samplers


class UniformSampler(nn.Module):
    """t ~ U{0..T-1}, importance weight 1."""

    def __init__(self, num_timesteps: int) -> None:
        super().__init__()
        self.num_timesteps = num_timesteps

    def sample(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        """t (batch,) and the importance weights 1 / (T p_t) that keep the loss unbiased."""
        return torch.randint(0, self.num_timesteps, (batch,), device=device), torch.ones(batch, device=device)

    def update_with_local_losses(self, t: Tensor, losses: Tensor) -> None:
        """Record per-example losses (only loss-aware samplers use them)."""


class LossAwareSampler(UniformSampler):
    """p_t ∝ sqrt(E[L_t^2]) over the last 10 losses per t, mixed with 0.001 uniform (Improved DDPM Sec. 3.3).

    Uniform until every t has 10 losses. The history is a buffer, so it is saved and resumed with the model.
    """

    history_per_term = 10
    uniform_prob = 0.001

    def __init__(self, num_timesteps: int) -> None:
        super().__init__(num_timesteps)
        self.register_buffer("history", torch.zeros(num_timesteps, self.history_per_term, dtype=torch.float64))
        self.register_buffer("count", torch.zeros(num_timesteps, dtype=torch.long))

    def weights(self) -> Tensor:
        if not bool((self.count == self.history_per_term).all()):
            return torch.ones(self.num_timesteps, dtype=torch.float64)
        w = self.history.cpu().pow(2).mean(-1).sqrt()
        return w / w.sum() * (1 - self.uniform_prob) + self.uniform_prob / self.num_timesteps

    def sample(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
        p = self.weights()
        p = p / p.sum()
        t = torch.multinomial(p, batch, replacement=True)
        return t.to(device), (1 / (self.num_timesteps * p[t])).float().to(device)

    @torch.no_grad()
    def update_with_local_losses(self, t: Tensor, losses: Tensor) -> None:
        for ti, loss in zip(t.tolist(), losses.double().tolist()):
            c = int(self.count[ti])
            if c == self.history_per_term:  # drop the oldest
                self.history[ti] = torch.roll(self.history[ti], -1)
                self.history[ti, -1] = loss
            else:
                self.history[ti, c] = loss
                self.count[ti] += 1


def create_timestep_sampler(name: str, diffusion: GaussianDiffusion) -> UniformSampler:
    """``uniform`` or ``loss-aware`` (for L_vlb)."""
    if name == "uniform":
        return UniformSampler(diffusion.num_timesteps)
    if name == "loss-aware":
        return LossAwareSampler(diffusion.num_timesteps)
    raise ValueError(f"unknown timestep sampler '{name}'; use 'uniform' or 'loss-aware'")
