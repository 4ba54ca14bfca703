"""Fréchet distance, streaming statistics and the real-statistics cache, against independent math."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from vid2vid.eval.frechet import (
    GaussianStats,
    StreamingStats,
    frechet_distance,
    load_or_compute_real_stats,
    sha256_file,
    stats_cache_key,
)


def random_stats(rng: np.random.Generator, n: int, d: int, shift: float = 0.0) -> GaussianStats:
    x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d)) + shift
    return GaussianStats(x.mean(axis=0), np.cov(x, rowvar=False), n)


def test_identical_statistics_give_zero():
    s = random_stats(np.random.default_rng(0), 500, 32)
    assert abs(frechet_distance(s, s)) < 1e-6


def test_diagonal_covariances_match_closed_form():
    rng = np.random.default_rng(1)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(GaussianStats(mu1, np.diag(v1), 10), GaussianStats(mu2, np.diag(v2), 10))
    assert got == pytest.approx(expected, rel=1e-10)


def test_one_dimensional_gaussians():
    # W2^2 between N(0, 4) and N(3, 1): 9 + (2 - 1)^2 = 10
    a = GaussianStats(np.array([0.0]), np.array([[4.0]]), 2)
    b = GaussianStats(np.array([3.0]), np.array([[1.0]]), 2)
    assert frechet_distance(a, b) == pytest.approx(10.0)


def test_invariant_to_permuting_feature_dimensions():
    rng = np.random.default_rng(2)
    a, b = random_stats(rng, 300, 24), random_stats(rng, 300, 24, shift=0.5)
    perm = rng.permutation(24)

    def permuted(s):
        return GaussianStats(s.mean[perm], s.cov[np.ix_(perm, perm)], s.count)

    assert frechet_distance(permuted(a), permuted(b)) == pytest.approx(frechet_distance(a, b), rel=1e-9)
    assert frechet_distance(a, b) > 0.1


def test_symmetric_and_grows_with_mean_shift():
    rng = np.random.default_rng(3)
    a, b = random_stats(rng, 400, 8), random_stats(rng, 400, 8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-8)
    far = GaussianStats(b.mean + 10, b.cov, b.count)
    assert frechet_distance(a, far) > frechet_distance(a, b) + 500  # ~ 8 * 10^2


def test_singular_covariances_give_finite_value():
    rng = np.random.default_rng(4)
    a, b = random_stats(rng, 5, 64), random_stats(rng, 6, 64, shift=1.0)  # rank <= 5 in 64 dims
    assert np.linalg.matrix_rank(a.cov) < 64
    value = frechet_distance(a, b)
    assert np.isfinite(value) and value > 0
    rank_one = GaussianStats(np.zeros(3), np.outer([1.0, 2, 3], [1.0, 2, 3]), 2)
    zero = GaussianStats(np.zeros(3), np.zeros((3, 3)), 2)
    assert frechet_distance(rank_one, zero) == pytest.approx(14.0, abs=1e-3)  # Tr(S1) when S2 = 0


def test_mismatched_or_broken_statistics_are_errors():
    a = GaussianStats(np.zeros(4), np.eye(4), 2)
    with pytest.raises(ValueError, match="feature dims differ: 4 vs 3"):
        frechet_distance(a, GaussianStats(np.zeros(3), np.eye(3), 2))
    with pytest.raises(ValueError, match="NaN or infinity"):
        frechet_distance(a, GaussianStats(np.full(4, np.nan), np.eye(4), 2))
    not_psd = GaussianStats(np.zeros(2), np.array([[1.0, 0.0], [0.0, -1.0]]), 2)
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(not_psd, GaussianStats(np.zeros(2), np.eye(2), 2))


def test_streaming_equals_batch_statistics_with_merge():
    rng = np.random.default_rng(5)
    x = rng.normal(size=(103, 12)) * 0.01 + 1e4  # |mean| >> std: raw sums would lose digits here
    first, second = StreamingStats(), StreamingStats()
    for chunk in np.array_split(x[:60], 7):
        first.update(chunk)
    for chunk in np.array_split(x[60:], 3):
        second.update(torch.from_numpy(chunk))  # torch batches too
    stats = first.merge(second).finalize()
    assert stats.count == 103
    np.testing.assert_allclose(stats.mean, x.mean(axis=0), rtol=0, atol=1e-9)
    np.testing.assert_allclose(stats.cov, np.cov(x, rowvar=False), rtol=1e-9, atol=1e-13)  # cov ~ 1e-4


def test_streaming_merge_into_empty_and_errors():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(10, 3))
    merged = StreamingStats().merge(StreamingStats().update(x)).finalize()
    np.testing.assert_allclose(merged.cov, np.cov(x, rowvar=False), rtol=1e-12)
    with pytest.raises(ValueError, match="needs >= 2 feature vectors, got 1"):
        StreamingStats().update(x[:1]).finalize()
    with pytest.raises(ValueError, match="features have 4 dims, these statistics have 3"):
        StreamingStats().update(x).update(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"must be \(B, D\)"):
        StreamingStats().update(np.zeros(3))


def test_sha256_file(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_cache_key_separates_every_field():
    sha = "a" * 64
    base = stats_cache_key("cityscapes", "val", "512x256", "i3d", sha)
    variants = [
        stats_cache_key("cityscapes", "train", "512x256", "i3d", sha),
        stats_cache_key("cityscapes", "val", (1024, 512), "i3d", sha),
        stats_cache_key("cityscapes", "val", "512x256", "resnext101", sha),
        stats_cache_key("cityscapes", "val", "512x256", "i3d", "b" * 64),
        stats_cache_key("city/scapes", "val", "512x256", "i3d", sha),
        stats_cache_key("city_scapes", "val", "512x256", "i3d", sha),
    ]
    assert len({base, *variants}) == 7
    assert stats_cache_key("cityscapes", "val", (512, 256), "i3d", sha) == base
    assert all(c.isalnum() or c in "-_." for c in variants[4])
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        stats_cache_key("cityscapes", "val", "512x256", "i3d", "/path/to/rgb_imagenet.pt")


def test_real_stats_computed_once_then_loaded(tmp_path):
    rng = np.random.default_rng(7)
    expected = random_stats(rng, 50, 6)
    calls = []

    def compute():
        calls.append(1)
        return expected

    key = stats_cache_key("synthetic", "val", "64x32", "i3d", "c" * 64)
    first = load_or_compute_real_stats(tmp_path, key, compute)
    second = load_or_compute_real_stats(tmp_path, key, compute)
    assert len(calls) == 1
    assert (tmp_path / f"{key}.npz").is_file() and not list(tmp_path.glob("*.tmp*"))
    for got in (first, second):
        np.testing.assert_array_equal(got.mean, expected.mean)
        np.testing.assert_array_equal(got.cov, expected.cov)
        assert got.count == 50
    (tmp_path / f"{key}.npz").rename(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="holds statistics for key"):
        load_or_compute_real_stats(tmp_path, "other", compute)
