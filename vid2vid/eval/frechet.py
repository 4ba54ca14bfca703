"""Fréchet distance between Gaussian fits of features, streaming statistics, and their disk cache.

``d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017; the paper's video FID
with I3D / ResNeXt features, and FVD with I3D logits). Computed in float64 with
``scipy.linalg.sqrtm`` and pytorch-fid's safeguards: if the square root is not finite or does not
square back to the product (a singular product, e.g. fewer clips than feature dimensions), both
covariances get ``eps * I`` added and the root is recomputed; an imaginary part that rounding
explains is dropped, a large one is an error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.linalg

log = logging.getLogger(__name__)

# Bump when feature extraction or preprocessing changes, so cached real statistics are recomputed.
STATS_PROTOCOL = "v1"
_SQRTM_RTOL = 1e-6  # |root @ root - product| / |product| above this means sqrtm failed
_IMAG_ATOL = 1e-3  # pytorch-fid's tolerance on the imaginary diagonal, here relative to its scale


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


def _sqrtm(m: np.ndarray) -> np.ndarray | None:
    """sqrtm(m), or None if it is not finite or does not square back to ``m``."""
    with warnings.catch_warnings():  # scipy warns about singular inputs; the residual check decides
        warnings.simplefilter("ignore")
        root = scipy.linalg.sqrtm(m)
    if not np.isfinite(root).all():
        return None
    scale = max(np.linalg.norm(m), np.finfo(np.float64).tiny)
    return root if np.linalg.norm(root @ root - m) <= _SQRTM_RTOL * scale else None


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = 1e-6) -> float:
    """Squared Fréchet distance between N(a.mean, a.cov) and N(b.mean, b.cov), in float64."""
    _check_pair(a, b)
    mu1, mu2 = a.mean.astype(np.float64), b.mean.astype(np.float64)
    s1, s2 = a.cov.astype(np.float64), b.cov.astype(np.float64)
    root = _sqrtm(s1 @ s2)
    if root is None:
        log.info("frechet_distance: singular covariance product; adding %g * I to both covariances", eps)
        offset = np.eye(s1.shape[0]) * eps
        root = _sqrtm((s1 + offset) @ (s2 + offset))
        if root is None:
            raise ValueError(f"frechet_distance: sqrtm failed even with eps={eps} added to both covariances")
    if np.iscomplexobj(root):
        diag = np.diagonal(root)
        worst = float(np.abs(diag.imag).max())
        if worst > _IMAG_ATOL * max(1.0, float(np.abs(diag.real).max())):
            raise ValueError(f"frechet_distance: sqrtm has an imaginary component up to {worst:.3g}; "
                             f"the covariances are not valid (not symmetric positive semi-definite?)")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(root))


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
