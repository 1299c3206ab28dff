"""Distribution metrics over feature vectors: closed forms, unbiasedness, known-overlap clouds.

Every random draw is seeded, so each test is deterministic; the tolerances are nevertheless
chosen with a margin of several standard errors (stated at each test) so that they would hold
for other seeds too and a real regression, not sampling noise, is what trips them.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import threads

from genzoo.eval import metrics as M
from genzoo.eval.metrics import (
    FEATURE_METRICS,
    class_coverage,
    cubic_polynomial_kernel,
    density_coverage,
    fd,
    feature_stats,
    frechet_distance,
    kid,
    mmd2_unbiased,
    precision_recall,
)

F64 = torch.float64


@pytest.fixture(autouse=True)
def _single_thread():
    # These tests run thousands of tiny ops (10x10 to 500x500 kernels) where intra-op threads
    # only add barrier overhead; on a loaded 2-core box OpenMP spin-waits made the KID test
    # 10-50x slower (1 s -> 10 s). One thread keeps the file's runtime stable; restored after.
    with threads(1):
        yield


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _random_spd(d: int, g: torch.Generator) -> torch.Tensor:
    a = torch.randn(d, d, generator=g, dtype=F64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=F64)


# --------------------------------------------------------------------------- feature_stats / FD


def test_feature_stats_matches_torch_cov():
    x = torch.randn(50, 4, generator=_gen(0))  # float32 in, float64 out
    mu, sigma = feature_stats(x)
    assert mu.dtype == F64 and sigma.dtype == F64
    torch.testing.assert_close(mu, x.double().mean(0))
    torch.testing.assert_close(sigma, torch.cov(x.double().T, correction=1))


def test_fd_diagonal_closed_form():
    # Diagonal covariances commute: the trace term is sum_i (sqrt(a_i) - sqrt(b_i))^2.
    g = _gen(1)
    d = 6
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    a = torch.rand(d, generator=g, dtype=F64) * 3 + 0.1
    b = torch.rand(d, generator=g, dtype=F64) * 3 + 0.1
    expected = float((mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum())
    got = frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert got == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_fd_non_commuting_2x2_by_hand():
    # For a 2x2 matrix with non-negative eigenvalues, Tr(A^1/2) = sqrt(tr A + 2 sqrt(det A)),
    # since (sqrt(l1) + sqrt(l2))^2 = l1 + l2 + 2 sqrt(l1 l2). With A = S1 S2 (similar to
    # S1^1/2 S2 S1^1/2) this gives the FD of non-commuting covariances without any sqrtm.
    s1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=F64)
    s2 = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=F64)
    assert not torch.allclose(s1 @ s2, s2 @ s1)
    mu1 = torch.tensor([0.5, -1.0], dtype=F64)
    mu2 = torch.tensor([1.5, 0.0], dtype=F64)
    prod = s1 @ s2
    tr_sqrt = math.sqrt(float(torch.trace(prod)) + 2 * math.sqrt(float(torch.det(prod))))
    expected = 2.0 + float(torch.trace(s1) + torch.trace(s2)) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fd_general_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    g = _gen(2)
    d = 10
    s1, s2 = _random_spd(d, g), _random_spd(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    covmean = linalg.sqrtm(s1.numpy() @ s2.numpy())  # the classic (non-symmetric) FID route
    expected = float((mu1 - mu2).pow(2).sum() + torch.trace(s1) + torch.trace(s2)) - 2 * float(covmean.trace().real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_fd_singular_covariances():
    # Rank-deficient (N < D in practice): S1 = diag(1, 0), S2 = diag(0, 1) -> S1^1/2 S2 S1^1/2 = 0,
    # so FD = Tr S1 + Tr S2 = 2; eigenvalue clamping must not produce NaN.
    s1 = torch.diag(torch.tensor([1.0, 0.0], dtype=F64))
    s2 = torch.diag(torch.tensor([0.0, 1.0], dtype=F64))
    z = torch.zeros(2, dtype=F64)
    assert frechet_distance(z, s1, z, s2) == pytest.approx(2.0, abs=1e-12)


def test_fd_symmetric_and_zero_for_identical_stats():
    g = _gen(3)
    d = 7
    s1, s2 = _random_spd(d, g), _random_spd(d, g)
    mu1, mu2 = torch.randn(d, generator=g, dtype=F64), torch.randn(d, generator=g, dtype=F64)
    ab = frechet_distance(mu1, s1, mu2, s2)
    ba = frechet_distance(mu2, s2, mu1, s1)
    assert ab > 0.1
    assert ab == pytest.approx(ba, rel=1e-9)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-10)
    x = torch.randn(300, d, generator=g)
    assert fd(x, x) == pytest.approx(0.0, abs=1e-10)


def test_fd_samples_same_distribution_near_zero_and_shift_adds_delta_squared():
    # N = 5000, D = 8, correlated Gaussian. Same distribution: the estimator's bias is
    # ~2D/N = 0.003 from the means plus O(D^2/N) from the covariances; observed 0.007-0.026
    # across seeds (0.012 for this one), so bound 0.05. Shifting every coordinate by delta adds delta^2 * D = 2.0 to
    # the mean term; the cross term 2 delta . (mu1 - mu2) has std ~0.06, so tolerance 0.25.
    g = _gen(4)
    d, n, delta = 8, 5000, 0.5
    a = torch.randn(d, d, generator=g, dtype=F64) / math.sqrt(d) + torch.eye(d, dtype=F64)
    x = torch.randn(n, d, generator=g, dtype=F64) @ a
    y = torch.randn(n, d, generator=g, dtype=F64) @ a
    same = fd(x, y)
    assert 0.0 <= same < 0.05
    shifted = fd(x, y + delta)
    assert shifted == pytest.approx(delta**2 * d, abs=0.25)
    assert fd(x, y + 2 * delta) > shifted + 3.0  # (2 delta)^2 D = 8 vs 2: grows with the shift


# --------------------------------------------------------------------------- KID / MMD


def test_mmd2_unbiased_matches_explicit_u_statistic():
    g = _gen(5)
    x = torch.randn(6, 3, generator=g, dtype=F64)
    y = torch.randn(5, 3, generator=g, dtype=F64) + 0.3

    def k(a, b):
        return (float(a @ b) / 3 + 1) ** 3

    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    assert mmd2_unbiased(x, y, cubic_polynomial_kernel) == pytest.approx(xx + yy - 2 * xy, rel=1e-12)


def test_mmd2_unbiased_has_zero_mean_where_biased_estimator_does_not():
    # 200 independent pairs of fresh samples (10 points each, D = 4) from the same N(0, I):
    # the U-statistic's mean must be within 4 standard errors of 0 (observed |mean| < 0.7 SE),
    # while the V-statistic (diagonals kept) carries a positive O(1/m) bias, observed ~1.9,
    # i.e. > 25 of its standard errors.
    g = _gen(6)
    kern = cubic_polynomial_kernel

    def mmd2_biased(x, y):
        return float(kern(x, x).mean() + kern(y, y).mean() - 2 * kern(x, y).mean())

    unbiased, biased = [], []
    for _ in range(200):
        x = torch.randn(10, 4, generator=g, dtype=F64)
        y = torch.randn(10, 4, generator=g, dtype=F64)
        unbiased.append(mmd2_unbiased(x, y, kern))
        biased.append(mmd2_biased(x, y))
    u, b = torch.tensor(unbiased), torch.tensor(biased)
    se_u, se_b = u.std() / math.sqrt(len(u)), b.std() / math.sqrt(len(b))
    assert abs(u.mean()) < 4 * se_u
    assert b.mean() > 10 * se_b
    assert b.mean() - u.mean() > 1.0


def test_kid_same_vs_shifted():
    g = _gen(7)
    x = torch.randn(1000, 16, generator=g)
    y = torch.randn(1000, 16, generator=g)
    same_mean, same_std = kid(x, y, subsets=30, subset_size=300, generator=_gen(8))
    shift_mean, shift_std = kid(x, y + 0.5, subsets=30, subset_size=300, generator=_gen(8))
    # Observed: same -0.001 +- 0.006 (std over subsets), shifted 0.93 +- 0.075.
    assert abs(same_mean) < 0.02
    assert shift_mean > 0.5
    assert shift_mean > 5 * shift_std
    assert same_std > 0 and shift_std > 0
    # Same generator seed -> same subsets -> same result.
    assert kid(x, y, subsets=30, subset_size=300, generator=_gen(8)) == (same_mean, same_std)


def test_kid_clips_subset_size_to_smaller_set():
    g = _gen(9)
    x = torch.randn(40, 3, generator=g)
    y = torch.randn(25, 3, generator=g)
    mean, std = kid(x, y, subsets=3, subset_size=1000, generator=_gen(10))
    assert math.isfinite(mean) and math.isfinite(std)
    # One subset of the full smaller set vs all 25 rows of y: y's draw is a permutation of y.
    mean1, _ = kid(x[:25], y, subsets=1, subset_size=1000, generator=_gen(11))
    assert mean1 == pytest.approx(mmd2_unbiased(x[:25], y), rel=1e-9)


# --------------------------------------------------------------------------- precision / recall


def _clouds(seed: int, n: int = 2000, d: int = 2):
    g = _gen(seed)
    real = torch.rand(n, d, generator=g)
    fake = torch.rand(n, d, generator=g)
    return real, fake


def test_precision_recall_identical_distribution():
    real, fake = _clouds(11)
    p, r = precision_recall(real, fake, k=3)
    assert p > 0.9 and r > 0.9  # observed ~0.98 / ~0.98


def test_precision_recall_half_overlap():
    # real ~ U[0,1]^2, fake ~ U[0.5,1.5] x [0,1]: half of each set lies in the other's support.
    # In 2-D with N = 2000 and k = 3 the k-NN radius is ~sqrt(3 / (pi N)) ~ 0.022, so balls
    # leak past the support edge by ~2% of the unit width; interior holes are rare (identical
    # clouds score ~0.98). Observed 0.48-0.53 over 20 seeds; tolerance 0.08.
    real, fake = _clouds(12)
    fake[:, 0] += 0.5
    p, r = precision_recall(real, fake, k=3)
    assert p == pytest.approx(0.5, abs=0.08)
    assert r == pytest.approx(0.5, abs=0.08)


def test_precision_recall_disjoint_and_fidelity_vs_diversity():
    real, fake = _clouds(13)
    assert precision_recall(real, fake + 10.0, k=3) == (0.0, 0.0)
    # Fake confined to the left half of real's support: every fake is realistic (precision ~1),
    # but only half of real is reproduced (recall ~0.5).
    fake_left = fake.clone()
    fake_left[:, 0] *= 0.5
    p, r = precision_recall(real, fake_left, k=3)
    assert p > 0.9
    assert r == pytest.approx(0.5, abs=0.08)


def test_chunked_distances_match_unchunked(monkeypatch):
    real, fake = _clouds(14, n=300, d=3)
    fake[:, 0] += 0.3
    full_pr = precision_recall(real, fake, k=3)
    full_dc = density_coverage(real, fake, k=5)
    monkeypatch.setattr(M, "_CHUNK", 7)  # several chunks plus a ragged last one
    assert precision_recall(real, fake, k=3) == full_pr
    assert density_coverage(real, fake, k=5) == full_dc


def test_knn_rejects_bad_k():
    real, fake = _clouds(15, n=5)
    with pytest.raises(ValueError):
        precision_recall(real, fake, k=5)
    with pytest.raises(ValueError):
        density_coverage(real, fake, k=0)


# --------------------------------------------------------------------------- density / coverage


def test_density_coverage_identical_distribution():
    # Naeem et al.: E[density] = 1 for identical distributions, E[coverage] ~ 1 - 2^-k for M = N
    # (= 0.969 at k = 5). Observed over 20 seeds: density 0.98-1.03, coverage 0.957-0.986.
    real, fake = _clouds(16)
    density, coverage = density_coverage(real, fake, k=5)
    assert density == pytest.approx(1.0, abs=0.15)
    assert coverage > 0.9
    assert coverage == pytest.approx(1 - 2**-5, abs=0.03)


def test_density_coverage_half():
    real, fake = _clouds(17)
    # Fake fills the left half of real's support at double density: each fake point still sits
    # in ~k real balls (density ~1, observed ~0.98) but only half the real balls are reached
    # (coverage ~0.5, observed 0.50-0.54 over 20 seeds: balls straddling x = 0.5 are reached
    # from the left).
    left = fake.clone()
    left[:, 0] *= 0.5
    density, coverage = density_coverage(real, left, k=5)
    assert density == pytest.approx(1.0, abs=0.15)
    assert coverage == pytest.approx(0.5, abs=0.08)
    # Fake shifted half out of the support: both drop to ~0.5 (observed 0.49-0.53 / 0.48-0.52).
    shifted = fake.clone()
    shifted[:, 0] += 0.5
    density, coverage = density_coverage(real, shifted, k=5)
    assert density == pytest.approx(0.5, abs=0.08)
    assert coverage == pytest.approx(0.5, abs=0.08)


# --------------------------------------------------------------------------- class coverage


def test_class_coverage_exact_values():
    out = class_coverage(torch.tensor([0, 0, 1, 1]), num_classes=4)
    assert out["coverage"] == 0.5
    assert out["entropy_ratio"] == pytest.approx(math.log(2) / math.log(4))  # = 0.5
    assert out["max_share"] == 0.5

    uniform = class_coverage(list(range(5)) * 3, num_classes=5)
    assert uniform == pytest.approx({"coverage": 1.0, "entropy_ratio": 1.0, "max_share": 0.2})

    collapsed = class_coverage(torch.full((10,), 3), num_classes=10)
    assert collapsed == pytest.approx({"coverage": 0.1, "entropy_ratio": 0.0, "max_share": 1.0})

    skewed = class_coverage(torch.tensor([0, 0, 0, 1]), num_classes=2)
    h = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert skewed == pytest.approx({"coverage": 1.0, "entropy_ratio": h / math.log(2), "max_share": 0.75})


def test_class_coverage_rejects_out_of_range_labels():
    with pytest.raises(ValueError):
        class_coverage(torch.tensor([0, 4]), num_classes=4)
    with pytest.raises(ValueError):
        class_coverage(torch.tensor([-1, 0]), num_classes=4)


# --------------------------------------------------------------------------- registry


def test_feature_metrics_registry():
    assert set(FEATURE_METRICS) == {"fd", "kid", "precision", "recall", "density", "coverage"}
    real, fake = _clouds(18, n=200, d=4)
    fake = fake + 0.2
    p, r = precision_recall(real, fake)
    dens, cov = density_coverage(real, fake)
    expected = {
        "fd": fd(real, fake),
        "kid": kid(real, fake, generator=_gen(19))[0],
        "precision": p,
        "recall": r,
        "density": dens,
        "coverage": cov,
    }
    for name, fn in FEATURE_METRICS.items():
        value = fn(real, fake, _gen(19))
        assert isinstance(value, float)
        assert value == pytest.approx(expected[name], rel=1e-12, abs=1e-15), name
