"""Vector quantisation (VQ-VAE, van den Oord et al. 2017), shared by the VQ-VAE and DALL·E's VQ tokenizer.

``L = ||sg(z_e) - e||^2 + beta ||z_e - sg(e)||^2`` (Eq. 3): beta weighs the *commitment* term
(the encoder's), not the codebook term. The decoder sees ``z_e + sg(e - z_e)``, so gradients pass
straight through to the encoder. With ``ema=True`` the codebook is the ratio of moving averages
of cluster sums and counts (App. A.1; decay 0.99, Laplace smoothing 1e-5) and only the
commitment term remains. Codes unused for a while are restarted on random encoder outputs
(Dhariwal et al. 2020, Jukebox Sec. 3.2), so the codebook does not shrink to a few entries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth (1 to K)."""
    p = counts.double() / counts.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).float()


class VectorQuantizer(nn.Module):
    """``forward(z_e) -> (z_q, codes, terms)`` for z_e (B, D, H, W); ``terms`` holds ``codebook``,
    ``commitment`` (already times beta) and ``perplexity`` of this batch's code histogram."""

    def __init__(
        self,
        num_codes: int,
        dim: int,
        *,
        beta: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        restart_threshold: float = 0.03,
        usage_decay: float = 0.95,
    ) -> None:
        super().__init__()
        self.num_codes, self.dim, self.beta = num_codes, dim, beta
        self.ema, self.decay, self.eps = ema, decay, eps
        # a code whose moving-average share falls below this fraction of the mean share is restarted;
        # usage_decay sets the window (0.95: about 20 steps), short so a dead code comes back quickly
        self.restart_threshold, self.usage_decay = restart_threshold, usage_decay
        init = torch.empty(num_codes, dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
        if ema:
            self.register_buffer("codebook", init)
            # one pseudo-count at each initial code (as a restart sets): with zero counts the first update would
            # divide an unused code's sum, 0.99 x init, by the smoothing constant and throw it ~1e5 x away
            self.register_buffer("cluster_size", torch.ones(num_codes))
            self.register_buffer("embed_sum", init.clone())
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("usage", torch.ones(num_codes))  # moving average of each code's share x num_codes

    def quantize(self, flat: Tensor) -> Tensor:
        """Nearest code index for each row of ``flat`` (N, D): argmin ||x||^2 - 2 x.e + ||e||^2."""
        with torch.autocast(flat.device.type, enabled=False):  # in bf16 the distances pick other codes
            flat, e = flat.float(), self.codebook.float()
            d = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ e.t() + e.pow(2).sum(1)[None]
        return d.argmin(1)

    def embed(self, codes: Tensor) -> Tensor:
        """(B, H, W) code indices -> (B, D, H, W) code vectors."""
        return F.embedding(codes, self.codebook).permute(0, 3, 1, 2).contiguous()

    def forward(self, z_e: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        b, d, h, w = z_e.shape
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        codes = self.quantize(flat.detach())
        onehot = F.one_hot(codes, self.num_codes).float()
        counts = onehot.sum(0)
        if self.training:
            self._update(flat.detach().float(), onehot, counts)
        e = F.embedding(codes, self.codebook)
        terms = {"commitment": self.beta * F.mse_loss(flat, e.detach())}
        terms["codebook"] = F.mse_loss(e, flat.detach()) if not self.ema else flat.new_zeros(())
        terms["perplexity"] = perplexity(counts.detach())
        z_q = flat + (e - flat).detach()  # straight-through estimator
        return z_q.view(b, h, w, d).permute(0, 3, 1, 2), codes.view(b, h, w), terms

    @torch.no_grad()
    def _update(self, flat: Tensor, onehot: Tensor, counts: Tensor) -> None:
        share = counts / counts.sum() * self.num_codes
        self.usage.mul_(self.usage_decay).add_(share, alpha=1 - self.usage_decay)
        if self.ema:
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            with torch.autocast(flat.device.type, enabled=False):  # the cluster sums, like the distances, in fp32
                self.embed_sum.mul_(self.decay).add_(onehot.t() @ flat, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (n + self.num_codes * self.eps) * n  # Laplace smoothing
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        dead = self.usage < self.restart_threshold
        if bool(dead.any()):  # one host sync per training step; restarts are rare and worth it
            idx = torch.randint(0, flat.shape[0], (int(dead.sum()),), device=flat.device)
            fresh = flat[idx]
            self.codebook.data[dead] = fresh.to(self.codebook.dtype)
            if self.ema:
                self.embed_sum[dead] = fresh
                self.cluster_size[dead] = 1.0
            self.usage[dead] = 1.0
