"""A Gaussian mixture whose noised marginals, exact denoiser and exact classifier are closed form.

If x_0 ~ sum_k w_k N(mu_k, S_k), then x_t ~ sum_k w_k N(sqrt(abar) mu_k, abar S_k + (1 - abar) I),
so the score, the ideal eps-prediction E[eps | x_t] = -sqrt(1 - abar) grad log q(x_t) and the
posterior class probabilities p(k | x_t) are exact: the tests drive the samplers and guidances
with them and compare the samples against the mixture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from genzoo.diffusion.gaussian_diffusion import GaussianDiffusion


@dataclass
class GaussianMixture:
    weights: Tensor  # (K,)
    means: Tensor  # (K, D)
    covs: Tensor  # (K, D, D)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)[k]
        z = torch.randn(n, self.means.shape[1], 1, generator=generator, dtype=self.means.dtype)
        return self.means[k] + (chol @ z).squeeze(-1), k

    def _noised(self, abar: Tensor) -> tuple[Tensor, Tensor]:
        """Per-sample component means (B, K, D) and covariances (B, K, D, D) of q(x_t)."""
        a = abar.view(-1, 1, 1)
        means = a.sqrt() * self.means.unsqueeze(0)
        eye = torch.eye(self.means.shape[1], dtype=self.means.dtype)
        covs = a.unsqueeze(-1) * self.covs.unsqueeze(0) + (1 - a).unsqueeze(-1) * eye
        return means, covs

    def log_joint(self, x: Tensor, abar: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log w_k N(x; m_k, C_k) (B, K), and the per-component scores -C_k^-1 (x - m_k) (B, K, D)."""
        means, covs = self._noised(abar)
        diff = x.unsqueeze(1) - means
        prec = torch.linalg.inv(covs)
        score_k = -(prec @ diff.unsqueeze(-1)).squeeze(-1)
        maha = (diff * -score_k).sum(-1)
        d = x.shape[1]
        logdet = torch.logdet(covs)
        logp = torch.log(self.weights) - 0.5 * (maha + logdet + d * torch.log(torch.tensor(2 * torch.pi, dtype=x.dtype)))
        return logp, score_k, means

    def posterior(self, x: Tensor, abar: Tensor) -> Tensor:
        """p(k | x_t) (B, K)."""
        return self.log_joint(x, abar)[0].softmax(-1)

    def score(self, x: Tensor, abar: Tensor, component: Tensor | None = None) -> Tensor:
        """grad log q(x_t) of the mixture, or of one component per sample."""
        logp, score_k, _ = self.log_joint(x, abar)
        if component is not None:
            return score_k[torch.arange(x.shape[0]), component]
        return (logp.softmax(-1).unsqueeze(-1) * score_k).sum(1)


def exact_eps_model(gmm: GaussianMixture, diffusion: GaussianDiffusion):
    """``model(x_t, t, cond)`` returning E[eps | x_t]; with ``cond['y']`` the component's (conditional) eps.

    ``cond['drop']`` marks samples whose condition is dropped (the unconditional model), as CFG does.
    """
    abar_table = torch.as_tensor(diffusion.tables["abar"])

    def model(x: Tensor, t: Tensor, cond=None) -> Tensor:
        abar = abar_table[t].to(torch.float64)
        xd = x.double()
        s = gmm.score(xd, abar)
        if cond and "y" in cond:
            s_c = gmm.score(xd, abar, cond["y"])
            drop = cond.get("drop")
            s = s_c if drop is None else torch.where(drop[:, None], s, s_c)
        return (-(1 - abar).sqrt().unsqueeze(-1) * s).to(x.dtype)

    return model


def exact_classifier(gmm: GaussianMixture, diffusion: GaussianDiffusion):
    """``classifier(x_t, t) -> log p(k | x_t)``: the ideal noisy classifier of classifier guidance."""
    abar_table = torch.as_tensor(diffusion.tables["abar"])

    def classifier(x: Tensor, t: Tensor) -> Tensor:
        logp, _, _ = gmm.log_joint(x.double(), abar_table[t].double())
        return logp.log_softmax(-1).to(x.dtype)

    return classifier
