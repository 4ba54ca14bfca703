"""Fréchet distance between Gaussian fits of features, its bootstrap interval, streaming statistics,
and the real-statistics disk cache.

``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017; the paper's video FID
with I3D / ResNeXt features, and FVD with I3D logits), in float64.

The trace of the square root is computed in its symmetric form, ``Tr (F^T S2 F)^(1/2)`` with
``F F^T = S1`` (Cholesky's factor, or ``S1^(1/2)`` when S1 is singular): both matrices are symmetric
positive semi-definite, so ``S1 S2`` is similar to that symmetric matrix and has the same (real,
non-negative) eigenvalues. A factorisation and one symmetric eigenvalue problem replace
``scipy.linalg.sqrtm`` of the non-symmetric product (~10 s at 2048-d here, and prone to complex
round-off); rank-deficient statistics (fewer clips than dimensions) need no special case, since
eigenvalues that round-off pushed below zero are clipped at zero. Should an eigen decomposition fail
anyway, both covariances get ``eps * I`` added and it is tried again (pytorch-fid's safeguard). A matrix that is not
symmetric, or has an eigenvalue clearly below zero, is an error: it is not a covariance.

Bootstrap (:func:`frechet_with_interval`): the generated clips' features are resampled with
replacement (the real statistics stay fixed: they are the same for every model compared against
them), each resample's distance computed exactly, and the 95% interval is the *basic* bootstrap
interval ``[2 d - q97.5, 2 d - q2.5]``. The Fréchet distance of a finite sample is biased upwards
(by roughly D^2 / 4N for identity covariances), and the resamples are biased once more the same way,
so the percentile interval ``[q2.5, q97.5]`` would sit above the true distance; the basic interval
reflects that bias back. It covers the true distance from about N >= D clips on (tested); below,
the bias is larger than the bootstrap can see and the interval sits above the truth (the service
tags such metrics). Each resample costs one eigenvalue problem of size min(distinct clips drawn,
dims): the non-zero eigenvalues of ``S_r^(1/2) X^T X S_r^(1/2)`` are those of ``X S_r X^T``, so with
few clips it is solved in the span of the clips, never in feature space.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

# Bump when feature extraction or preprocessing changes, so cached real statistics are recomputed.
STATS_PROTOCOL = "v2"
_PSD_RTOL = 1e-8  # eigenvalues below -_PSD_RTOL * largest: not round-off, not a covariance
_SYM_RTOL = 1e-8


@dataclass
class GaussianStats:
    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64, unbiased (ddof=1), as np.cov
    count: int  # number of feature vectors behind the fit

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


class StreamingStats:
    """Mean and covariance of feature batches, accumulated in float64, mergeable across workers.

    It keeps the running mean and the centred sum of outer products (Chan et al.'s parallel update)
    rather than the raw sums ``sum x`` and ``sum x x^T``: with the raw sums the covariance is a
    difference of two large numbers and loses digits when |mean| >> std, which pooled ReLU features
    can be. Same memory (D + D^2 floats), same cost per batch.
    """

    def __init__(self, dim: int | None = None):
        self.dim = dim
        self.count = 0
        self._mean = None if dim is None else np.zeros(dim)
        self._m2 = None if dim is None else np.zeros((dim, dim))

    def _merge_moments(self, count: int, mean: np.ndarray, m2: np.ndarray) -> None:
        if self._mean is None:
            self.dim = mean.shape[0]
            self._mean, self._m2 = np.zeros(self.dim), np.zeros((self.dim, self.dim))
        if mean.shape[0] != self.dim:
            raise ValueError(f"StreamingStats: features have {mean.shape[0]} dims, "
                             f"these statistics have {self.dim}")
        total = self.count + count
        delta = mean - self._mean
        self._mean = self._mean + delta * (count / total)
        self._m2 = self._m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.count = total

    def update(self, features) -> StreamingStats:
        """Add a batch (B, D) of features (numpy array or torch tensor, any float dtype)."""
        if hasattr(features, "detach"):  # torch tensor, without importing torch here
            features = features.detach().cpu().double().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"StreamingStats.update: features must be (B, D), got shape {x.shape}")
        if x.shape[0] == 0:
            return self
        if not np.isfinite(x).all():
            raise ValueError("StreamingStats.update: features contain NaN or infinity")
        mean = x.mean(axis=0)
        centred = x - mean
        self._merge_moments(x.shape[0], mean, centred.T @ centred)
        return self

    def merge(self, other: StreamingStats) -> StreamingStats:
        """Fold another accumulator (e.g. from another Ray worker) into this one."""
        if other.count:
            self._merge_moments(other.count, other._mean, other._m2)
        return self

    def finalize(self) -> GaussianStats:
        if self.count < 2:
            raise ValueError(f"StreamingStats.finalize: a covariance needs >= 2 feature vectors, "
                             f"got {self.count}")
        return GaussianStats(self._mean.copy(), self._m2 / (self.count - 1), self.count)


def _check_pair(a: GaussianStats, b: GaussianStats) -> None:
    for label, s in (("first", a), ("second", b)):
        d = s.mean.shape[0] if s.mean.ndim == 1 else -1
        if d < 1 or s.cov.shape != (d, d):
            raise ValueError(f"frechet_distance: {label} statistics have mean {s.mean.shape} and cov "
                             f"{s.cov.shape}; expected (D,) and (D, D)")
        if not (np.isfinite(s.mean).all() and np.isfinite(s.cov).all()):
            raise ValueError(f"frechet_distance: {label} statistics contain NaN or infinity")
    if a.mean.shape != b.mean.shape:
        raise ValueError(f"frechet_distance: feature dims differ: {a.mean.shape[0]} vs {b.mean.shape[0]} "
                         f"(statistics from different feature nets?)")


def _check_symmetric(m: np.ndarray, label: str) -> None:
    scale = max(float(np.abs(m).max()), np.finfo(np.float64).tiny)
    if float(np.abs(m - m.T).max()) > _SYM_RTOL * scale:
        raise ValueError(f"frechet_distance: the {label} covariance is not symmetric, so it is not a covariance")


def _eigvals_psd(m: np.ndarray, label: str) -> np.ndarray:
    """Eigenvalues of the symmetric PSD ``m``, round-off negatives clipped at zero."""
    w = np.linalg.eigvalsh((m + m.T) / 2)
    _check_nonnegative(w, label)
    return np.clip(w, 0.0, None)


def _check_nonnegative(w: np.ndarray, label: str) -> None:
    if not np.isfinite(w).all():
        raise np.linalg.LinAlgError(f"{label}: non-finite eigenvalues")
    top = max(float(np.abs(w).max()), np.finfo(np.float64).tiny)
    if float(w.min()) < -_PSD_RTOL * top:
        raise ValueError(f"frechet_distance: the {label} has an eigenvalue {float(w.min()):.3g} < 0 (largest "
                         f"{top:.3g}); the covariances are not symmetric positive semi-definite")


def sqrt_psd(m: np.ndarray, label: str = "first covariance") -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((m + m.T) / 2)
    _check_nonnegative(w, label)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def psd_factor(m: np.ndarray, label: str = "first covariance") -> np.ndarray:
    """Some F with F F^T = m: Cholesky's (a third of an eigen decomposition's cost) when m is positive
    definite, else the symmetric square root (rank-deficient statistics: fewer samples than dims).
    ``Tr (S1 S2)^(1/2)`` needs only the eigenvalues of F^T S2 F, which are those of S1 S2 for any F."""
    try:
        return scipy.linalg.cholesky((m + m.T) / 2, lower=True, check_finite=False)
    except np.linalg.LinAlgError:
        return sqrt_psd(m, label)


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """``Tr (S1 S2)^(1/2)`` for symmetric PSD ``S1``, ``S2``, as ``Tr (F^T S2 F)^(1/2)`` with F F^T = S1."""
    f = psd_factor(s1)
    return float(np.sqrt(_eigvals_psd(f.T @ s2 @ f, "product of the covariances")).sum())


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov), in float64."""
    _check_pair(a, b)
    s1, s2 = a.cov.astype(np.float64), b.cov.astype(np.float64)
    _check_symmetric(s1, "first")
    _check_symmetric(s2, "second")
    try:
        tr_root = trace_sqrt_product(s1, s2)
    except np.linalg.LinAlgError as err:
        log.info("frechet_distance: eigen decomposition failed (%s); adding %g * I to both covariances", err, eps)
        offset = np.eye(s1.shape[0]) * eps
        tr_root = trace_sqrt_product(s1 + offset, s2 + offset)
    diff = a.mean.astype(np.float64) - b.mean.astype(np.float64)
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_root)


# ------------------------------------------------------------------------------------------------
# Against the generated clips' features: exact value and bootstrap interval


@dataclass(frozen=True)
class FrechetEstimate:
    """A Fréchet distance with its sample: ``clips`` generated feature vectors of ``dim`` dimensions,
    and the basic-bootstrap interval at ``level`` over ``resamples`` resamples (None without one)."""

    value: float
    clips: int
    dim: int
    low: float | None = None
    high: float | None = None
    resamples: int = 0
    level: float = 0.95

    @property
    def fewer_clips_than_dims(self) -> bool:
        return self.clips < self.dim


class _GeneratedSide:
    """The generated features and the real statistics, prepared once for any reweighting of the clips.

    A resample is a vector of counts (how often each clip was drawn). With ``Y = X S_r^(1/2)`` the
    trace term needs the eigenvalues of ``Yc^T C Yc`` (D x D, C the counts) or, equally, of
    ``C^(1/2) Yc Yc^T C^(1/2)`` (u x u over the u distinct clips drawn): each resample takes the
    smaller. Features are centred on their own mean first: the distance is translation invariant, and
    the Gram matrices then carry no large common offset to cancel.
    """

    def __init__(self, real: GaussianStats, x: np.ndarray, ddof: int):
        self.n, self.dim = x.shape
        shift = x.mean(axis=0)
        self.x = x - shift
        self.mu_r = real.mean - shift
        cov_r = real.cov * ((real.count - 1) / (real.count - ddof))  # ddof 0: StyleGAN-V's biased covariance
        self.ddof = ddof
        self.tr_r = float(np.trace(cov_r))
        self.y = self.x @ psd_factor(cov_r, "real covariance")  # (N, D): Y Y^T = X S_r X^T
        self.gram_y = self.y @ self.y.T if self.n <= 2 * self.dim else None  # (N, N): X S_r X^T
        self.sq_norms = np.einsum("ij,ij->i", self.x, self.x)  # |x_i|^2

    def distance(self, counts: np.ndarray) -> float:
        keep = counts > 0
        c = counts[keep].astype(np.float64)
        n = float(c.sum())
        m = c @ self.x[keep] / n
        denominator = n - self.ddof
        if self.gram_y is not None and len(c) <= self.dim:
            k = self.gram_y[np.ix_(keep, keep)]
            a = k @ c / n  # y_i . m_y
            centred = k - a[:, None] - a[None, :] + float(c @ a) / n
            root_c = np.sqrt(c)
            w = _eigvals_psd(root_c[:, None] * centred * root_c[None, :] / denominator, "resampled product")
        else:
            yc = self.y[keep] - c @ self.y[keep] / n
            w = _eigvals_psd((yc * c[:, None]).T @ yc / denominator, "resampled product")
        tr_fake = float(c @ self.sq_norms[keep] - n * (m @ m)) / denominator
        diff = self.mu_r - m
        return float(diff @ diff + self.tr_r + tr_fake - 2.0 * np.sqrt(w).sum())


def frechet_with_interval(real: GaussianStats, features: np.ndarray, resamples: int = 500, level: float = 0.95,
                          seed: int = 0, ddof: int = 1) -> FrechetEstimate:
    """The Fréchet distance between ``real`` and the Gaussian fit of ``features`` (N, D), and the basic
    bootstrap interval over the N generated clips (module docstring). ``resamples=0``: no interval.
    ``ddof``: the covariances' divisor N - ddof (1, as np.cov; StyleGAN-V's FVD divides by N: 0)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"frechet_with_interval: features must be (N >= 2, D), got shape {x.shape}")
    if x.shape[1] != real.dim:
        raise ValueError(f"frechet_with_interval: feature dims differ: {real.dim} (real) vs {x.shape[1]}")
    if not np.isfinite(x).all():
        raise ValueError("frechet_with_interval: features contain NaN or infinity")
    side = _GeneratedSide(real, x, ddof)
    n = x.shape[0]
    value = side.distance(np.ones(n))
    if resamples <= 0:
        return FrechetEstimate(value, n, x.shape[1])
    rng = np.random.default_rng(seed)
    draws = np.array([side.distance(np.bincount(rng.integers(0, n, n), minlength=n)) for _ in range(resamples)])
    q_low, q_high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return FrechetEstimate(value, n, x.shape[1], max(0.0, 2 * value - q_high), 2 * value - q_low, resamples, level)


# ------------------------------------------------------------------------------------------------
# Real-data statistics cache
# ------------------------------------------------------------------------------------------------


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _slug(value: object) -> str:
    text = re.sub(r"[^A-Za-z0-9.]+", "_", str(value)).strip("_.")
    return text[-40:] or "_"


def stats_cache_key(dataset: str, split: str, resolution, net: str, weights_sha256: str) -> str:
    """A file-name-safe key, unique per (dataset, split, resolution, net, weights, STATS_PROTOCOL).

    The readable part is sanitised and may collide (``a/b`` vs ``a_b``); the trailing digest of the
    exact values does not, so two configurations never share a cache file.
    """
    if not re.fullmatch(r"[0-9a-f]{64}", str(weights_sha256)):
        raise ValueError(f"stats_cache_key: weights_sha256 must be 64 lowercase hex digits (sha256_file of "
                         f"the weights), got {weights_sha256!r}")
    if isinstance(resolution, (tuple, list)):
        resolution = "x".join(str(v) for v in resolution)
    values = [STATS_PROTOCOL, str(dataset), str(split), str(resolution), str(net), weights_sha256]
    digest = hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]
    readable = "-".join(_slug(v) for v in (dataset, split, resolution, net)) + f"-w{weights_sha256[:8]}"
    return f"{readable}-{digest}"


def save_stats(path: str | Path, stats: GaussianStats, key: str = "") -> None:
    """Write ``stats`` to an ``.npz`` atomically (temp file + rename: a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(tmp, mean=stats.mean, cov=stats.cov, count=np.int64(stats.count), key=np.str_(key))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_stats(path: str | Path, key: str | None = None) -> GaussianStats:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as data:
            stats = GaussianStats(data["mean"].astype(np.float64), data["cov"].astype(np.float64),
                                  int(data["count"]))
            stored_key = str(data["key"]) if "key" in data.files else ""
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"{path}: not a valid statistics file ({e}); delete it to recompute") from None
    if key is not None and stored_key != key:
        raise ValueError(f"{path}: holds statistics for key {stored_key!r}, expected {key!r}")
    d = stats.mean.shape[0] if stats.mean.ndim == 1 else -1
    if d < 1 or stats.cov.shape != (d, d):
        raise ValueError(f"{path}: mean {stats.mean.shape} and cov {stats.cov.shape} are not (D,) and (D, D)")
    return stats


def load_or_compute_real_stats(cache_dir: str | Path, key: str,
                               compute_fn: Callable[[], GaussianStats]) -> GaussianStats:
    """Statistics of the real clips from ``cache_dir/<key>.npz``, computed by ``compute_fn`` and
    cached on the first call. Real features depend only on the key's fields, so every evaluation of
    every checkpoint after the first skips the real-data pass."""
    path = Path(cache_dir) / f"{key}.npz"
    if path.is_file():
        log.info("real statistics from cache %s", path)
        return load_stats(path, key)
    stats = compute_fn()
    if not isinstance(stats, GaussianStats):
        raise TypeError(f"load_or_compute_real_stats: compute_fn returned {type(stats).__name__}, "
                        f"expected GaussianStats")
    save_stats(path, stats, key)
    log.info("real statistics cached at %s (%d clips, %d dims)", path, stats.count, stats.dim)
    return stats
