"""A Gaussian mixture whose noised marginals, exact denoiser and exact classifier are closed form.

If x_0 ~ sum_k w_k N(mu_k, S_k) then x_t ~ sum_k w_k N(sqrt(abar) mu_k, abar S_k + (1 - abar) I)
(DDPM Eq. 4 applied to each component), so the score, the ideal eps-prediction
E[eps | x_t] = -sqrt(1 - abar_t) grad log q(x_t) (Tweedie; Song et al. 2021 Eq. 15) and the
posterior p(k | x_t) are exact. Tests and benchmarks drive the samplers and guidances with them
and compare the samples with the mixture itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k w_k N(mu_k, S_k) in D dims: weights (K,), means (K, D), covs (K, D, D)."""

    weights: Tensor
    means: Tensor
    covs: Tensor

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """n draws and the component each came from."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], 1, generator=generator, dtype=self.means.dtype)
        return self.means[k] + (torch.linalg.cholesky(self.covs)[k] @ z).squeeze(-1), k

    def noised(self, abar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q(x_t) for each abar (N,): component means (N, K, D), precisions (N, K, D, D), log w_k - log Z_k (N, K)."""
        a = abar.to(self.means.dtype).view(-1, 1, 1, 1)
        eye = torch.eye(self.means.shape[1], dtype=self.means.dtype)
        covs = a * self.covs + (1 - a) * eye
        d = self.means.shape[1]
        log_norm = torch.log(self.weights) - 0.5 * (torch.logdet(covs) + d * math.log(2 * math.pi))
        return a[..., 0].sqrt() * self.means, torch.linalg.inv(covs), log_norm

    def log_joint(self, x: Tensor, abar: Tensor) -> tuple[Tensor, Tensor]:
        """log w_k N(x; .) (B, K) and the component scores -C_k^-1 (x - m_k) (B, K, D), abar per sample."""
        return _log_joint(x, *self.noised(abar))

    def posterior(self, x: Tensor, abar: Tensor) -> Tensor:
        """p(k | x_t) (B, K)."""
        return self.log_joint(x, abar)[0].softmax(-1)

    def score(self, x: Tensor, abar: Tensor) -> Tensor:
        """grad log q(x_t) of the whole mixture."""
        logp, score_k = self.log_joint(x, abar)
        return (logp.softmax(-1).unsqueeze(-1) * score_k).sum(1)

    def errors(self, x: Tensor) -> dict[str, float]:
        """How far samples ``x`` are from the mixture, each the worst over components.

        Samples are assigned softly, by the exact p(k | x): then w_k = E[p(k | x)], w_k mu_k = E[p(k | x) x] and
        w_k S_k = E[p(k | x) (x - mu_k)(x - mu_k)^T] hold exactly for draws of the mixture, however much its
        components overlap, so the estimates are consistent (hard assignment is biased where components overlap).
        ``weight``: |w_hat - w|; ``mean``: the Mahalanobis length of mu_hat - mu in S_k (in component standard
        deviations); ``cov``: ||S_hat - S||_F / ||S||_F.
        """
        x = x.to(self.means.dtype)
        p = self.posterior(x, torch.ones(len(x), dtype=x.dtype))
        w = p.mean(0)
        out = {"weight": (w - self.weights).abs().max().item(), "mean": 0.0, "cov": 0.0}
        for k in range(len(self.weights)):
            pk = p[:, k : k + 1] / p[:, k].sum()
            m = (pk * x).sum(0)
            c = (pk * (x - m)).T @ (x - m)
            diff = m - self.means[k]
            out["mean"] = max(out["mean"], (diff @ torch.linalg.solve(self.covs[k], diff)).sqrt().item())
            out["cov"] = max(out["cov"], (torch.linalg.norm(c - self.covs[k]) / torch.linalg.norm(self.covs[k])).item())
        return out


def _log_joint(x: Tensor, means: Tensor, prec: Tensor, log_norm: Tensor) -> tuple[Tensor, Tensor]:
    diff = x.unsqueeze(1) - means
    score_k = -torch.einsum("bkij,bkj->bki", prec, diff)
    return log_norm + 0.5 * (diff * score_k).sum(-1), score_k


class ExactDenoiser:
    """The ideal denoiser and noisy classifier of a mixture under a process, tabulated per timestep.

    Called as ``model(x_t, t, cond)`` with ORIGINAL timestep indices, it returns E[eps | x_t]; with
    ``cond["y"]`` it returns component y's eps (the conditional model), except where
    ``cond["drop"]`` is set (the null condition, as classifier-free guidance marks it).
    """

    def __init__(self, gmm: GaussianMixture, diffusion: GaussianDiffusion) -> None:
        abar = torch.as_tensor(diffusion.tables["abar"])
        self.tables = gmm.noised(abar)  # per-t tables: a sampling step does no matrix inverse
        self.sqrt_one_minus_abar = (1 - abar).sqrt()

    def log_joint(self, x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return _log_joint(x.double(), *(table[t] for table in self.tables))

    def __call__(self, x: Tensor, t: Tensor, cond: dict[str, Tensor] | None = None) -> Tensor:
        logp, score_k = self.log_joint(x, t)
        score = (logp.softmax(-1).unsqueeze(-1) * score_k).sum(1)
        if cond and "y" in cond:
            score_y = score_k[torch.arange(len(x)), cond["y"]]
            drop = cond.get("drop", torch.zeros(len(x), dtype=torch.bool))
            score = torch.where(drop[:, None], score, score_y)
        return (-self.sqrt_one_minus_abar[t, None] * score).to(x.dtype)

    def classifier(self, x: Tensor, t: Tensor) -> Tensor:
        """log p(k | x_t): the ideal noisy classifier of classifier guidance (differentiable in x)."""
        return self.log_joint(x, t)[0].log_softmax(-1).to(x.dtype)

    def grad_log_p_y(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """grad log p(y | x_t) = grad log q(x_t | y) - grad log q(x_t), in closed form."""
        logp, score_k = self.log_joint(x, t)
        score = (logp.softmax(-1).unsqueeze(-1) * score_k).sum(1)
        return (score_k[torch.arange(len(x)), y] - score).to(x.dtype)


def small_variance_mixture() -> GaussianMixture:
    """Three 2-D components of standard deviation 0.17-0.22 whose means are 0.6-0.7 apart (about 3 standard
    deviations: they overlap), weights 0.5 / 0.3 / 0.2: where ODE solvers differ (docs/diffusion.md). A solver that
    stops short of the data by a noise level sigma shrinks each covariance by about sigma^2 / (0.04 + sigma^2)."""
    f64 = torch.float64
    return GaussianMixture(
        weights=torch.tensor([0.5, 0.3, 0.2], dtype=f64),
        means=torch.tensor([[-0.3, 0.0], [0.35, 0.15], [0.0, 0.55]], dtype=f64),
        covs=torch.tensor(
            [[[0.04, 0.01], [0.01, 0.03]], [[0.03, -0.01], [-0.01, 0.05]], [[0.045, 0.0], [0.0, 0.035]]], dtype=f64
        ),
    )


def exact_eps_model(gmm: GaussianMixture, diffusion: GaussianDiffusion) -> ExactDenoiser:
    """``model(x_t, t, cond)`` returning the exact E[eps | x_t] (conditional on ``cond['y']`` when given)."""
    return ExactDenoiser(gmm, diffusion)


def exact_classifier(gmm: GaussianMixture, diffusion: GaussianDiffusion):
    """``classifier(x_t, t) -> log p(k | x_t)`` of the mixture under ``diffusion``."""
    return ExactDenoiser(gmm, diffusion).classifier
