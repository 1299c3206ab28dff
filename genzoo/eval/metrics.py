"""Distribution metrics over judge-network features: FD, KID, precision/recall, density/coverage.

Every metric takes feature matrices ``(N, D)`` (a judge network's penultimate layer, one row
per image) and works in float64 whatever the input dtype: covariance square roots and kernel
sums of thousands of terms lose digits in float32 that the metrics' small values cannot spare.
Pure torch; no scipy.

References
----------
- Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (FID); Dowson & Landau 1982 (Fréchet distance between Gaussians).
- Bińkowski et al. 2018, "Demystifying MMD GANs" (KID).
- Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for Assessing Generative Models".
- Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = [
    "FEATURE_METRICS",
    "class_coverage",
    "cubic_polynomial_kernel",
    "density_coverage",
    "fd",
    "feature_stats",
    "frechet_distance",
    "kid",
    "mmd2_unbiased",
    "precision_recall",
]

# Rows of the query set per torch.cdist call: a (1024, 10_000) float64 block is 80 MB, so
# 10k x 10k feature sets never materialise the full 800 MB distance matrix.
_CHUNK = 1024


def _as_features(x: Tensor, name: str) -> Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty")
    return x.detach().to(torch.float64)


def _check_same_dim(a: Tensor, b: Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {a.shape[1]} vs {b.shape[1]}")


# --------------------------------------------------------------------------- Fréchet distance


def feature_stats(feats: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (divisor ``N - 1``) of ``feats``, float64.

    These are the Gaussian fit that FID (Heusel et al. 2017, Sec. "FID") compares.
    """
    x = _as_features(feats, "feats")
    n = x.shape[0]
    if n < 2:
        raise ValueError("feature_stats needs at least 2 samples for a covariance")
    mu = x.mean(0)
    xc = x - mu
    sigma = xc.T @ xc / (n - 1)
    return mu, sigma


def _psd_sqrt(a: Tensor) -> Tensor:
    """Symmetric PSD square root via eigh; eigenvalues clamped at 0 (rounding makes tiny ones negative)."""
    a = 0.5 * (a + a.T)
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1: Tensor, sigma1: Tensor, mu2: Tensor, sigma2: Tensor) -> float:
    """Fréchet (2-Wasserstein²) distance between N(mu1, sigma1) and N(mu2, sigma2).

    ``||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1^½ S2 S1^½)^½)`` (Dowson & Landau 1982; Heusel et al.
    2017, Eq. 6 of the FID definition). The usual ``Tr((S1 S2)^½)`` is evaluated as
    ``Tr((S1^½ S2 S1^½)^½)``: the two matrices are similar, but the latter is symmetric PSD, so
    eigh gives real non-negative eigenvalues and no complex sqrtm of a non-symmetric product
    (scipy's route) is needed; singular covariances (N < D) are handled by the clamping.
    """
    mu1, mu2 = (torch.as_tensor(m).detach().to(torch.float64).reshape(-1) for m in (mu1, mu2))
    s1, s2 = (torch.as_tensor(s).detach().to(torch.float64) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu2.shape[0] != d or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(
            f"shape mismatch: mu1 {tuple(mu1.shape)}, mu2 {tuple(mu2.shape)}, "
            f"sigma1 {tuple(s1.shape)}, sigma2 {tuple(s2.shape)}"
        )
    sqrt_s1 = _psd_sqrt(s1)
    m = sqrt_s1 @ s2 @ sqrt_s1
    m = 0.5 * (m + m.T)  # float products drift from symmetric; eigh reads one triangle only
    tr_covmean = torch.linalg.eigvalsh(m).clamp_min(0).sqrt().sum()
    diff = mu1 - mu2
    value = diff @ diff + torch.trace(s1) + torch.trace(s2) - 2.0 * tr_covmean
    # The true distance is >= 0; a tiny negative is rounding (e.g. identical statistics).
    return max(float(value), 0.0)


def fd(real_feats: Tensor, fake_feats: Tensor) -> float:
    """Fréchet distance between Gaussian fits of two feature sets (FID when the judge is Inception)."""
    real = _as_features(real_feats, "real_feats")
    fake = _as_features(fake_feats, "fake_feats")
    _check_same_dim(real, fake)
    return frechet_distance(*feature_stats(real), *feature_stats(fake))


# --------------------------------------------------------------------------- KID


def cubic_polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """``k(x, y) = (x·y / d + 1)³`` (Bińkowski et al. 2018, Sec. 3, the KID kernel); returns ``(n, m)``."""
    d = x.shape[1]
    return (x @ y.T / d + 1.0) ** 3


def mmd2_unbiased(x: Tensor, y: Tensor, kernel: Callable[[Tensor, Tensor], Tensor] = cubic_polynomial_kernel) -> float:
    """Unbiased estimate of MMD²(P, Q) from samples ``x ~ P`` (m rows), ``y ~ Q`` (n rows).

    Gretton et al. 2012, Eq. 3 (used by Bińkowski et al. 2018 for KID): the within-set means
    skip the diagonals ``k(x_i, x_i)``, whose expectation is not ``E k(x, x')``; keeping them
    (the V-statistic) biases the estimate upward by O(1/m).
    """
    x = _as_features(x, "x")
    y = _as_features(y, "y")
    _check_same_dim(x, y)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError("mmd2_unbiased needs at least 2 samples per set")
    kxx = kernel(x, x)
    kyy = kernel(y, y)
    kxy = kernel(x, y)
    term_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(term_xx + term_yy - 2.0 * kxy.mean())


def kid(
    real: Tensor,
    fake: Tensor,
    *,
    subsets: int = 100,
    subset_size: int = 1000,
    generator: torch.Generator | None = None,
) -> tuple[float, float]:
    """Kernel Inception Distance: ``(mean, std)`` of unbiased MMD² over random subsets.

    Bińkowski et al. 2018, Sec. 3 / App. D: cubic polynomial kernel, estimates averaged over
    ``subsets`` random draws (without replacement within a draw) of ``subset_size`` rows from
    each set; ``subset_size`` is clipped to the smaller set. ``std`` is the population standard
    deviation over subsets (as in the reference implementations): the spread of one subset's
    estimate, not the standard error of the mean.
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    _check_same_dim(real, fake)
    if subsets < 1:
        raise ValueError("subsets must be >= 1")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2:
        raise ValueError("kid needs at least 2 samples per set")
    estimates = torch.empty(subsets, dtype=torch.float64)
    for s in range(subsets):
        ri = torch.randperm(real.shape[0], generator=generator)[:size]
        fi = torch.randperm(fake.shape[0], generator=generator)[:size]
        estimates[s] = mmd2_unbiased(real[ri], fake[fi], cubic_polynomial_kernel)
    return float(estimates.mean()), float(estimates.std(correction=0))


# --------------------------------------------------------------------------- k-NN manifold metrics


def _knn_radii(x: Tensor, k: int) -> Tensor:
    """Distance from each row of ``x`` to its k-th nearest neighbour in ``x``, itself excluded."""
    n = x.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} samples, got {k}")
    radii = torch.empty(n, dtype=torch.float64, device=x.device)
    for start in range(0, n, _CHUNK):
        d = torch.cdist(x[start : start + _CHUNK], x)
        # k+1 smallest: the first is the point itself (distance ~0); the last is the k-th neighbour.
        radii[start : start + _CHUNK] = d.topk(k + 1, dim=1, largest=False).values[:, k]
    return radii


def _ball_counts(query: Tensor, centres: Tensor, radii: Tensor) -> Tensor:
    """For each query row, how many balls ``B(centres_i, radii_i)`` (closed) contain it."""
    counts = torch.empty(query.shape[0], dtype=torch.int64, device=query.device)
    for start in range(0, query.shape[0], _CHUNK):
        d = torch.cdist(query[start : start + _CHUNK], centres)
        counts[start : start + _CHUNK] = (d <= radii[None, :]).sum(1)
    return counts


def _nearest_distance(query: Tensor, others: Tensor) -> Tensor:
    """Distance from each query row to its nearest row of ``others``."""
    out = torch.empty(query.shape[0], dtype=torch.float64, device=query.device)
    for start in range(0, query.shape[0], _CHUNK):
        out[start : start + _CHUNK] = torch.cdist(query[start : start + _CHUNK], others).min(1).values
    return out


def precision_recall(real: Tensor, fake: Tensor, *, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019, Eqs. 1-3).

    Each set's manifold is the union of balls around its points with radius the distance to the
    k-th nearest neighbour in the same set. Precision: fraction of fake points inside the real
    manifold (fidelity). Recall: fraction of real points inside the fake manifold (diversity).
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    _check_same_dim(real, fake)
    real_r = _knn_radii(real, k)
    fake_r = _knn_radii(fake, k)
    precision = (_ball_counts(fake, real, real_r) > 0).double().mean()
    recall = (_ball_counts(real, fake, fake_r) > 0).double().mean()
    return float(precision), float(recall)


def density_coverage(real: Tensor, fake: Tensor, *, k: int = 5) -> tuple[float, float]:
    """Density and coverage (Naeem et al. 2020, Eqs. 5-6); balls come from the real set only.

    ``density = 1/(kM) Σ_j Σ_i 1[fake_j ∈ B(real_i, r_i)]``: counts how many real balls hold each
    fake point, so it is ~1 when fake matches real and is not saturated by outliers in the real
    set the way precision is. ``coverage = 1/N Σ_i 1[∃ j: fake_j ∈ B(real_i, r_i)]``: the fraction
    of real neighbourhoods that some fake point reaches (expected ``1 - 2^-k``-ish for M = N
    identical distributions, Naeem et al. Sec. 3.2).
    """
    real = _as_features(real, "real")
    fake = _as_features(fake, "fake")
    _check_same_dim(real, fake)
    real_r = _knn_radii(real, k)
    density = _ball_counts(fake, real, real_r).double().sum() / (k * fake.shape[0])
    # Real ball i is covered iff its nearest fake point lies within r_i: one min per real row.
    coverage = (_nearest_distance(real, fake) <= real_r).double().mean()
    return float(density), float(coverage)


# --------------------------------------------------------------------------- class coverage


def class_coverage(predicted_labels: Tensor | Sequence[int], num_classes: int) -> dict[str, float]:
    """Mode coverage from a classifier's predicted labels on generated samples.

    ``coverage``: fraction of the ``num_classes`` classes predicted at least once (mode dropping).
    ``entropy_ratio``: entropy of the label histogram over ``log(num_classes)``, 1 for uniform
    class use, 0 for a single class (mode collapse). ``max_share``: the largest class's fraction.
    """
    if num_classes < 1:
        raise ValueError("num_classes must be >= 1")
    labels = torch.as_tensor(predicted_labels).reshape(-1).long()
    if labels.numel() == 0:
        raise ValueError("predicted_labels is empty")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes - 1}]")
    counts = torch.bincount(labels, minlength=num_classes).double()
    p = counts / counts.sum()
    nz = p[p > 0]  # 0 log 0 = 0
    entropy = float(-(nz * nz.log()).sum())
    # With one class the histogram is trivially uniform; avoid 0/0.
    ratio = entropy / math.log(num_classes) if num_classes > 1 else 1.0
    return {
        "coverage": float((counts > 0).double().mean()),
        "entropy_ratio": ratio,
        "max_share": float(p.max()),
    }


# --------------------------------------------------------------------------- registry

FeatureMetric = Callable[[Tensor, Tensor, "torch.Generator | None"], float]


def _fd_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return fd(real, fake)


def _kid_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return kid(real, fake, generator=generator)[0]


def _precision_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return precision_recall(real, fake)[0]


def _recall_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return precision_recall(real, fake)[1]


def _density_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return density_coverage(real, fake)[0]


def _coverage_metric(real: Tensor, fake: Tensor, generator: torch.Generator | None = None) -> float:
    return density_coverage(real, fake)[1]


#: Metric name -> ``f(real_feats, fake_feats, generator) -> float`` with the default settings
#: (KID: the subset mean; k=3 for precision/recall, k=5 for density/coverage). ``generator``
#: only matters for KID's subset draws; the others are deterministic. Lower is better for
#: "fd" and "kid", higher for the rest. Call the underlying functions to get paired values
#: (precision and recall, density and coverage) in one pass or to change settings.
FEATURE_METRICS: dict[str, FeatureMetric] = {
    "fd": _fd_metric,
    "kid": _kid_metric,
    "precision": _precision_metric,
    "recall": _recall_metric,
    "density": _density_metric,
    "coverage": _coverage_metric,
}
