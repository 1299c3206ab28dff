"""Higher-order solvers of the probability-flow ODE (and one SDE): EDM's Heun, DPM-Solver++(3M) and its SDE
variant, UniPC. Each is a ``DiffusionSampler``: it runs on the respaced process of its grid (``SamplerConfig.grid``:
uniform, quadratic, log-snr, karras; exact abar at every kept timestep), calls the model through the guidance's
eps-form path (``predict(..., eps_form=True)``, as DDIM and DPM-Solver++(2M) do), so every guidance works with it,
and steps with the same ``step(proc, net, x, t, i, ...)`` interface.

Notation (docs/diffusion.md): alpha = sqrt(abar), sigma = sqrt(1 - abar), lambda = log(alpha / sigma), and the data
prediction D = x0_hat (clamped when ``clip``); in EDM's variables x~ = x / alpha at noise level s = sigma / alpha the
ODE is dx~/ds = eps = (x~ - D) / s. Coefficients are computed on the host in float64 from the process's tables (the
grid index is a Python int), so a loop never waits on the device.

The last step, as DPM-Solver++(2M)'s: the grid has ``steps + 1`` points from t = T down to t = 1, the model is
evaluated at all but t = 1, and from the second-smallest point the solver returns x0_hat, a denoising step, rather
than spend an evaluation on the last interval. On the log-snr and karras grids that point is already close to the
data (10 steps on the linear schedule: sigma / alpha = 0.026 on log-snr, 0.059 on karras), so the jump is small;
on the uniform grid it is t = T / steps, a large jump whatever the solver (docs/diffusion.md measures both ways).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field
from torch import Tensor

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion
from genzoo.diffusion.samplers import DiffusionSampler, SamplerConfig, randn
from genzoo.registry import component

Grid = Literal["uniform", "quadratic", "log-snr", "karras"]


def schedule(proc: GaussianDiffusion) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """alpha, sigma and lambda = log(alpha / sigma) at every index of ``proc`` (float64, host)."""
    abar = proc.tables["abar"]
    return np.sqrt(abar), np.sqrt(1 - abar), 0.5 * (np.log(abar) - np.log1p(-abar))


# --------------------------------------------------------------------------- EDM's Heun


class EDMHeunConfig(SamplerConfig):
    """Heun's method settings: ``steps`` noise levels (2 steps - 1 model evaluations), EDM's churn (off by default)."""

    steps: int | str = Field(
        18, description="noise levels (EDM's N; 18 is its CIFAR-10 setting): 2 steps - 1 model evaluations"
    )
    grid: Grid = Field(
        "karras", description="which timesteps the solver steps on (SamplerConfig.grid); EDM's sigma grid"
    )
    churn: float = Field(
        0.0,
        ge=0,
        description="EDM's S_churn: each level's noise is raised by gamma = min(churn / steps, "
        "sqrt(2) - 1) of itself before its step (Alg. 2); 0: deterministic (Alg. 1)",
    )
    churn_min: float = Field(0.0, ge=0, description="EDM's S_tmin: churn only at levels with sigma / alpha >= this")
    churn_max: float | None = Field(
        None, gt=0, description="EDM's S_tmax: churn only at levels with sigma / alpha <= this"
    )
    churn_noise: float = Field(1.0, gt=0, description="EDM's S_noise: the added noise's scale")


@component("sampler", "edm-heun", config=EDMHeunConfig)
class EDMHeun(DiffusionSampler):
    """Heun's second-order method on the probability-flow ODE, with optional churn (Karras et al. 2022, EDM Alg. 1
    and 2).

    From level s = sigma / alpha to the next s': an Euler step x~' = x~ + (s' - s) eps, then the trapezoid
    x~' = x~ + (s' - s) (eps + eps') / 2 with eps' evaluated at the Euler point; from the last level the step is
    x0_hat (EDM's Euler step to sigma = 0). ``steps`` levels cost 2 steps - 1 evaluations. Churn (Alg. 2) first
    raises the noise of x to the level of the timestep nearest s (1 + gamma) above it, by the forward process
    q(x_c | x_t), and evaluates there: the network only sees integer timesteps, so the raised level is exactly one
    of them.
    """

    Config = EDMHeunConfig
    last_index = 1

    def __init__(self, cfg: EDMHeunConfig) -> None:
        super().__init__(cfg)
        self._churned: dict[int, tuple[GaussianDiffusion, dict[int, int], GaussianDiffusion]] = {}

    def nfe(self) -> int:
        return 2 * super().nfe() - 1

    def weights(self) -> tuple[float, float]:
        """The trapezoid's weights of the slopes at the start and at the Euler point."""
        return 0.5, 0.5

    def churn_plan(self, diffusion: GaussianDiffusion) -> tuple[dict[int, int], GaussianDiffusion]:
        """{grid index: index in the churn process} and the process on the raised timesteps (built once per process)."""
        hit = self._churned.get(id(diffusion))
        if hit is None or hit[0] is not diffusion:
            proc, cfg = self.respaced(diffusion), self.cfg
            abar = diffusion.tables["abar"]
            log_s = 0.5 * (np.log1p(-abar) - np.log(abar))
            gamma = min(cfg.churn / (proc.num_timesteps - self.last_index), math.sqrt(2) - 1)  # churn / levels
            raised = {}
            for i, g in enumerate(proc.timestep_map.tolist()[self.last_index :], start=self.last_index):
                s = math.exp(log_s[g])
                if s < cfg.churn_min or (cfg.churn_max is not None and s > cfg.churn_max):
                    continue
                c = int(np.abs(log_s - (log_s[g] + math.log1p(gamma))).argmin())
                if c > g:
                    raised[i] = c
            kept = sorted(set(raised.values())) or [diffusion.num_timesteps - 1]
            where = {i: kept.index(c) for i, c in raised.items()}
            hit = (diffusion, where, diffusion.respace(kept))
            self._churned[id(diffusion)] = hit
        return hit[1], hit[2]

    def start(self, diffusion, model) -> dict[str, Any]:
        if self.cfg.churn == 0:
            return {}
        where, churned = self.churn_plan(diffusion)
        return {"churn_at": where, "churn_proc": churned, "churn_net": churned.wrap(model)}

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        alpha, sigma, _ = schedule(proc)
        j = state.get("churn_at", {}).get(i)
        if j is None:
            pred = self.predict(proc, net, x, t, cond, guidance, eps_form=True)
            a, s = alpha[i], sigma[i] / alpha[i]
        else:  # x_c ~ q(x_c | x_t): sqrt(abar_c / abar_t) x_t + sqrt(1 - abar_c / abar_t) z
            cproc, cnet = state["churn_proc"], state["churn_net"]
            ratio = float(cproc.tables["abar"][j] / proc.tables["abar"][i])
            z = randn(x.shape, x, generator=generator)
            x = math.sqrt(ratio) * x + self.cfg.churn_noise * math.sqrt(1 - ratio) * z
            c_alpha, c_sigma, _ = schedule(cproc)
            pred = self.predict(cproc, cnet, x, torch.full_like(t, j), cond, guidance, eps_form=True)
            a, s = c_alpha[j], c_sigma[j] / c_alpha[j]
        if i == self.last_index:
            return pred.pred_xstart
        a_next, s_next = alpha[i - 1], sigma[i - 1] / alpha[i - 1]
        x_tilde, ds = x / a, s_next - s
        euler = (x_tilde + ds * pred.pred_eps) * a_next
        pred_next = self.predict(proc, net, euler, t - 1, cond, guidance, eps_form=True)
        w0, w1 = self.weights()
        return (x_tilde + ds * (w0 * pred.pred_eps + w1 * pred_next.pred_eps)) * a_next


# --------------------------------------------------------------------------- DPM-Solver++(3M) and its SDE variant


class MultistepConfig(SamplerConfig):
    """Multistep solver settings: ``steps`` model evaluations on the grid."""

    grid: Grid = Field("log-snr", description="which timesteps the solver steps on (SamplerConfig.grid)")


@component("sampler", "dpmpp-3m", config=MultistepConfig)
class DPMSolverPlusPlus3M(DiffusionSampler):
    """DPM-Solver++(3M) (Lu et al. 2022, Sec. 4 and App. B): third-order multistep exponential integrator in
    lambda, data prediction.

    With h = lambda' - lambda and the data predictions D0, D1, D2 at the last three points (r0, r1: the two
    previous steps over h): x' = (sigma' / sigma) x - alpha' (e^-h - 1) D0 + alpha' (phi2 d1 - phi3 d2), where
    d10 = (D0 - D1) / r0, d11 = (D1 - D2) / r1, d1 = d10 + r0 / (r0 + r1) (d10 - d11) (= h D' + O(h^3)),
    d2 = 2 (d10 - d11) / (r0 + r1) (= h^2 D'' + O(h^3)), phi2 = (e^-h - 1) / h + 1, phi3 = phi2 / h - 1/2: the
    Taylor terms of the exact integral sigma' int e^lambda D dlambda. The multistep third-order update of the
    DPM-Solver repository, diffusers and k-diffusion takes d2 without the factor 2 (h^2 D'' / 2, where phi3 takes
    h^2 D''; their singlestep DPM-Solver-3 has it), which leaves a local error O(h^3): second order overall, as
    measured against the exact flow of Gaussian data (tests/test_solvers.py). The first step is first order, the
    second second order (phi2 d10); the last returns x0_hat.
    """

    Config = MultistepConfig
    last_index = 1
    eta = 0.0  # the SDE variant's noise fraction; 0: the probability-flow ODE

    def phis(self, h: float) -> tuple[float, float]:
        """phi2 and phi3 at the step h (times (1 + eta) for the SDE)."""
        phi2 = math.expm1(-h) / h + 1
        return phi2, phi2 / h - 0.5

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        d = self.predict(proc, net, x, t, cond, guidance, eps_form=True).pred_xstart
        if i == self.last_index:
            return d
        alpha, sigma, lam = schedule(proc)
        h = float(lam[i - 1] - lam[i])
        eta = float(self.eta)
        h_eta = h * (1 + eta)
        out = (sigma[i - 1] / sigma[i] * math.exp(-eta * h)) * x - (alpha[i - 1] * math.expm1(-h_eta)) * d
        ds, hs = state.setdefault("d", []), state.setdefault("h", [])
        phi2, phi3 = self.phis(h_eta)
        if len(ds) >= 2:
            r0, r1 = hs[-1] / h, hs[-2] / h
            d10, d11 = (d - ds[-1]) / r0, (ds[-1] - ds[-2]) / r1
            d1 = d10 + (r0 / (r0 + r1)) * (d10 - d11)
            d2 = (d10 - d11) * (2 / (r0 + r1))  # h^2 D'': twice the reference code's (see the docstring)
            out = out + (alpha[i - 1] * phi2) * d1 - (alpha[i - 1] * phi3) * d2
        elif ds:
            out = out + (alpha[i - 1] * phi2 / (hs[-1] / h)) * (d - ds[-1])
        if eta > 0:
            out = out + self.noise_scale(sigma[i - 1], h) * randn(x.shape, x, generator=generator)
        ds.append(d)
        hs.append(h)
        del ds[:-2], hs[:-2]
        return out

    def noise_scale(self, sigma_next: float, h: float) -> float:
        """The SDE's noise: sigma' sqrt(1 - e^(-2 eta h))."""
        return float(sigma_next * math.sqrt(-math.expm1(-2 * self.eta * h)))


class SDEConfig(MultistepConfig):
    """DPM-Solver++(3M) SDE settings."""

    eta: float = Field(
        1.0,
        gt=0,
        description="the fraction of the reverse SDE's noise (k-diffusion's eta): 1 is the "
        "reverse SDE; 0 would be the ODE (use dpm-solver++3m)",
    )


@component("sampler", "dpmpp-3m-sde", config=SDEConfig)
class DPMSolverPlusPlus3MSDE(DPMSolverPlusPlus3M):
    """DPM-Solver++(3M) SDE (Lu et al. 2022's SDE-DPM-Solver++ at third order, k-diffusion's ``sample_dpmpp_3m_sde``).

    The reverse SDE's exponential integrator: x' = (sigma' / sigma) e^(-eta h) x - alpha' (e^(-h (1 + eta)) - 1) D0
    + alpha' (phi2 d1 - phi3 d2) + sigma' sqrt(1 - e^(-2 eta h)) z, the phis of DPM-Solver++(3M) at h (1 + eta).
    """

    Config = SDEConfig

    def __init__(self, cfg: SDEConfig) -> None:
        super().__init__(cfg)
        self.eta = cfg.eta


# --------------------------------------------------------------------------- UniPC


class UniPCConfig(MultistepConfig):
    """UniPC settings."""

    order: int = Field(
        2, ge=1, le=3, description="the predictor's order p (UniP-p); the corrector UniC raises it to p + 1"
    )


@component("sampler", "unipc", config=UniPCConfig)
class UniPC(DiffusionSampler):
    """UniPC (Zhao et al. 2023, Alg. 2 and 3, B(h) = e^h - 1, "bh2"): a multistep predictor UniP-p with the
    corrector UniC, data prediction.

    The corrector reuses the evaluation at the predicted point, so it costs no evaluation: at each point the
    model's D corrects the point just reached (UniC, order p + 1), then UniP steps from the corrected point.
    Coefficients rho solve R rho = b with R_kj = r_j^(k-1), b_k = k! phi_(k+1)(h) / B(h) (diffusers'
    ``multistep_uni_p_bh_update`` / ``multistep_uni_c_bh_update``; rho = 1/2 for UniP-2 and UniC-1). The last
    point is corrected too, then denoised with the eps its evaluation implies: x0 = D + (x_corrected - x) / alpha,
    clamped as x0_hat is.
    """

    Config = UniPCConfig
    last_index = 1

    def coefficients(self, h: float, rks: list[float], corrector: bool) -> np.ndarray:
        """rho for the differences (D_k - D0) / r_k (and, for the corrector, D_new - D0)."""
        order = len(rks) + 1  # UniP-p and UniC-p both take the p - 1 earlier points
        if order == (1 if corrector else 2):
            return np.array([0.5])
        hh = -h
        h_phi_k, factorial, b_h = math.expm1(hh) / hh - 1, 1, math.expm1(hh)
        r = np.array([*rks, 1.0])
        big_r, b = [], []
        for k in range(1, order + 1):
            big_r.append(r ** (k - 1))
            b.append(h_phi_k * factorial / b_h)
            factorial *= k + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        big_r, b = np.stack(big_r), np.array(b)
        if corrector:
            return np.linalg.solve(big_r, b)
        return np.linalg.solve(big_r[:-1, :-1], b[:-1])

    def update(
        self, x: Tensor, ds: list[Tensor], i: int, proc: GaussianDiffusion, order: int, new: Tensor | None = None
    ) -> Tensor:
        """From the point i + 1 (corrector: ``new`` is D at i) or i (predictor) to the next; ds[-1] is D at the
        start."""
        alpha, sigma, lam = schedule(proc)
        s0, t_ = (i + 1, i) if new is not None else (i, i - 1)
        h = float(lam[t_] - lam[s0])
        rks = [float((lam[s0 + k] - lam[s0]) / h) for k in range(1, order)]
        diffs = [(ds[-1 - k] - ds[-1]) / rk for k, rk in enumerate(rks, start=1)]
        m0 = ds[-1]
        out = (sigma[t_] / sigma[s0]) * x - (alpha[t_] * math.expm1(-h)) * m0
        b_h = math.expm1(-h)
        if new is not None:
            rho = self.coefficients(h, rks, corrector=True)
            res = sum(float(c) * dk for c, dk in zip(rho[:-1], diffs)) + float(rho[-1]) * (new - m0)
        elif diffs:
            rho = self.coefficients(h, rks, corrector=False)
            res = sum(float(c) * dk for c, dk in zip(rho, diffs))
        else:
            return out
        return out - (alpha[t_] * b_h) * res

    def step(self, proc, net, x, t, i, *, cond, guidance, generator, state):
        d = self.predict(proc, net, x, t, cond, guidance, eps_form=True).pred_xstart
        ds = state.setdefault("d", [])
        predicted = x
        if ds:  # UniC: correct the point reached, with the D evaluated there
            corrected = self.update(state["x"], ds, i, proc, state["order"], new=d)
            # a guidance's after_step may have moved the point (ILVR, inpainting): the correction is applied to
            # where it put it, as a shift from the predictor's own output, so the projection is not undone
            x = corrected if predicted is state["raw"] else predicted + (corrected - state["raw"])
        ds.append(d)
        del ds[:-3]
        if i == self.last_index:  # x0 from the corrected point with the evaluated one's eps, processed as x0_hat is
            alpha, _, _ = schedule(proc)
            x0, process = d + (x - predicted) / alpha[i], self.process_xstart(proc)
            return x0 if process is None else process(x0)
        order = min(self.cfg.order, len(ds))
        state["x"], state["order"] = x, order
        state["raw"] = self.update(x, ds, i, proc, order)
        return state["raw"]
