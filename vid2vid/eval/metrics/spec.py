"""What a metric is, as the registry (``metrics/__init__.py``) holds it.

Every metric is computed inside one fused pass over the clips (``worker.py``): an actor generates a
batch once and each metric reads what it needs from it. So a metric is not a function run end to
end, as in stylegan3's ``metric_main``, but a description of its share of that pass:

- :class:`FeatureMetric`: a Fréchet distance. The actor returns one feature vector per clip (the column
  ``<name>``, with ``<name>_valid``); the driver compares the generated clips' features with the real
  clips' cached statistics (``metric_utils.frechet_values``).
- :class:`TemporalFamily`: per-clip sums (its ``columns``) from which the driver forms one or more
  :class:`TemporalMetric` ratios, summed over all clips first (so a long clip weighs more).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from torch import Tensor


class NetPass:
    """One feature net on one prepared input. ``trunk`` runs at most once, however many metrics read it
    (FID-I3D and FVD share I3D's trunk when their inputs are the same)."""

    def __init__(self, net, x: Tensor):
        self.net, self.x = net, x
        self._trunk: Tensor | None = None

    @property
    def trunk(self) -> Tensor:
        if self._trunk is None:
            self._trunk = self.net.trunk(self.x)
        return self._trunk


@dataclass(frozen=True)
class FeatureMetric:
    name: str  # the MLflow metric is eval/<name>
    net: str  # feature net (feature_nets.SPECS), whose weights setting the registry reads
    view: str  # input protocol (preprocess.PROTOCOLS)
    dim: int
    features: Callable[[NetPass], Tensor]  # (B, dim) features of a prepared input
    ddof: int = 1  # covariance divisor N - ddof
    label: str = ""  # for the README table and the eval/protocol tag
    min_input: int = 0  # smallest input size (px) the feature is defined at
    too_small: str = ""  # why the metric is skipped below min_input: "{min}" and "{size}" filled in


@dataclass(frozen=True)
class ClipSample:
    """One generated clip beside its real one: what a temporal family measures."""

    fake: Tensor  # (N, T, 3, H, W) in [-1, 1]: the whole generated batch (clip i is fake[i])
    clip: Any  # the real batch (datasets.shards.Clip): frames, flow, confidence
    i: int
    fake_u8: np.ndarray  # (T, H, W, 3) uint8 frames of the generated clip i
    real_flows: np.ndarray | None  # (T, H, W, 2) backward flows of the real clip i (None: no estimator)
    real_valid: np.ndarray | None  # (T,) frame pairs whose real flow exists
    flow: Any  # the flow estimator (datasets.flow.FlowEstimator) or None


@dataclass(frozen=True)
class TemporalMetric:
    name: str  # the MLflow metric is eval/<name>, plus "_recon" for E's reconstruction when per_kind
    numerator: str  # column summed over clips
    denominator: str  # column summed over clips; the metric is numerator / denominator
    per_kind: bool = True  # one value per generated kind; False: the real clips' own (no suffix)
    undefined: str | None = None  # logged as skipped when the denominator is 0 (None: left out)


@dataclass(frozen=True)
class TemporalFamily:
    """Per-clip columns computed together (``measure``), and the metrics formed from their sums."""

    columns: tuple[str, ...]
    measure: Callable[[ClipSample], dict[str, float]]
    metrics: tuple[TemporalMetric, ...]
