"""Shared utilities of the metrics (after stylegan3's ``metrics/metric_utils.py``): uint8 clips to each
protocol's input, every feature net's features in one pass, and the driver's side, which folds the
actors' per-clip rows into the registry's metrics.

Rows carry a ``kind``: ``real`` (features of the real clips whose statistics are not cached yet),
``fake`` (generated with sampled styles, or a plain model) or ``recon`` (a multimodal model's
reconstruction from E's features of the real frames, logged with the suffix ``_recon``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from vid2vid.eval.frechet import FrechetEstimate, StreamingStats, frechet_with_interval, load_or_compute_real_stats
from vid2vid.eval.metrics import FEATURE_METRICS, TEMPORAL_FAMILIES, FeatureMetric, metric_name
from vid2vid.eval.metrics.spec import NetPass
from vid2vid.eval.preprocess import SIZES, Frame, preprocess_clips

log = logging.getLogger("vid2vid.eval")

FAKE, RECON, REAL = "fake", "recon", "real"  # row kinds: sampled styles (or a plain model), E's features, data
SUFFIX = {FAKE: "", RECON: "_recon"}  # metric-name suffix of each generated kind


# ------------------------------------------------------------------------------------------------
# Features (in the actors)


def frames_to_input(frames: np.ndarray, view: str, size: int | None = None, frame: Frame = "crop",
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, 16, S, S) by the protocol ``view`` (the uint8 frames move to
    ``device`` first: resizing on the GPU, and 4x fewer bytes over PCIe)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)
    x = preprocess_clips(x, view, frame=frame)
    if size is not None and size != SIZES[view]:
        b, c, t, s, _ = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, s, s)
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = flat.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4).contiguous()
    return x


class FeatureExtractor:
    """Every feature net of an evaluation, loaded once; ``__call__`` maps uint8 clips to the features
    of each requested metric (registry names). ``paths``: net -> local weights file."""

    def __init__(self, paths: dict[str, str], metrics: list[str], sizes: dict[str, int] | None = None,
                 frame: Frame = "crop", device: str | torch.device = "cpu"):
        from vid2vid.eval.feature_nets import load_feature_net

        self.metrics = [FEATURE_METRICS[m] for m in metrics]
        self.sizes = {**SIZES, **(sizes or {})}
        self.frame, self.device = frame, device
        self.nets = {net: load_feature_net(net, paths[net], device) for net in {m.net for m in self.metrics}}

    @property
    def random_weights(self) -> dict[str, bool]:
        return {net: bool(getattr(n, "random_weights", False)) for net, n in self.nets.items()}

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, metrics: list[str] | None = None) -> dict[str, np.ndarray]:
        """(B, T, H, W, 3) uint8 -> {metric: (B, dim) float32} for ``metrics`` (default: all)."""
        wanted = [m for m in self.metrics if metrics is None or m.name in metrics]
        out: dict[str, np.ndarray] = {}
        for view in dict.fromkeys(m.view for m in wanted):
            x = frames_to_input(frames, view, self.sizes[view], self.frame, self.device)
            passes: dict[str, NetPass] = {}  # one pass of each net per input
            for m in (m for m in wanted if m.view == view):
                p = passes.setdefault(m.net, NetPass(self.nets[m.net], x))
                out[m.name] = m.features(p).float().cpu().numpy()
        return out


# ------------------------------------------------------------------------------------------------
# Folding the rows (on the driver)


@dataclass
class Totals:
    """What the driver folds from the actors' rows: streaming statistics of the real features, the
    generated features, and the sums of each temporal column per generated kind."""

    real: dict[str, StreamingStats] = field(default_factory=dict)
    fake: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=lambda: defaultdict(dict))
    sums: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    real_clips: int = 0
    actor_startup: float = 0.0  # the slowest actor's loading time (they start side by side)

    def add(self, batch: dict[str, np.ndarray], metrics: list[str]) -> None:
        kinds = np.asarray(batch["kind"]).astype(str)
        index = np.asarray(batch["index"]).astype(int)
        self.real_clips += int((kinds == REAL).sum())
        self.actor_startup = max(self.actor_startup, float(np.max(batch["startup_s"], initial=0.0)))
        for m in metrics:
            valid = np.asarray(batch[f"{m}_valid"], bool)
            rows = valid & (kinds == REAL)
            if rows.any():
                self.real.setdefault(m, StreamingStats()).update(batch[m][rows])
            for row in np.flatnonzero(valid & (kinds != REAL)):
                self.fake[(m, kinds[row])][int(index[row])] = np.asarray(batch[m][row], np.float64)
        for kind in set(kinds) - {REAL}:
            rows = kinds == kind
            for family in TEMPORAL_FAMILIES:
                for column in family.columns:
                    self.sums[(column, kind)] += float(np.asarray(batch[column], np.float64)[rows].sum())

    def features(self, metric: str, kind: str) -> np.ndarray:
        """(N, D) generated features in clip order (the bootstrap's seed then means the same resamples)."""
        by_index = self.fake[(metric, kind)]
        return np.stack([by_index[i] for i in sorted(by_index)])


@dataclass
class FrechetValues:
    values: dict[str, float]  # MLflow names: <name>, <name>/clips, <name>/ci95_low, <name>/ci95_high
    estimates: dict[str, FrechetEstimate]  # MLflow name -> value, clips, interval
    small_n: dict[str, str]  # <metric><suffix> -> why its estimate is unreliable (fewer clips than dims)


def frechet_values(totals: Totals, metrics: list[FeatureMetric], kinds: list[str], keys: dict[str, str],
                   cache_dir: Path, random: dict[str, bool], bootstrap: int) -> FrechetValues:
    """Every Fréchet metric with its clip count and interval (``random``: net -> random test weights;
    ``keys``: metric -> real-statistics cache key)."""
    out = FrechetValues({}, {}, {})
    for m in metrics:
        real = load_or_compute_real_stats(cache_dir, keys[m.name], lambda m=m: totals.real[m.name].finalize())
        for kind in kinds:
            est = frechet_with_interval(real, totals.features(m.name, kind), bootstrap, seed=0, ddof=m.ddof)
            name = metric_name(f"eval/{m.name}{SUFFIX[kind]}", random[m.net])
            out.estimates[name] = est
            out.values.update({name: est.value, f"{name}/clips": float(est.clips)})
            if est.low is not None:
                out.values.update({f"{name}/ci95_low": est.low, f"{name}/ci95_high": est.high})
            if est.fewer_clips_than_dims:
                why = (f"{est.clips} clips < {est.dim} feature dimensions: the estimate is biased far upwards and "
                       f"its bootstrap interval does not cover the true distance reliably (it does from N >= D "
                       f"on, see the README); compare runs only at equal clip counts")
                out.small_n[f"{m.name}{SUFFIX[kind]}"] = why
                log.warning("%s: %s", name, why)
    return out


def temporal_values(totals: Totals, kinds: list[str], skipped: dict[str, str]) -> dict[str, float]:
    """Every temporal metric, a ratio of column sums; an undefined one is added to ``skipped``."""
    out = {}
    for kind in kinds:
        for family in TEMPORAL_FAMILIES:
            for m in family.metrics:
                name = f"eval/{m.name}{SUFFIX[kind] if m.per_kind else ''}"
                denominator = totals.sums[(m.denominator, kind)]
                if denominator > 0:
                    out[name] = totals.sums[(m.numerator, kind)] / denominator
                elif m.undefined is not None:
                    skipped[name] = m.undefined
    return out
