"""The metric registry: every metric the evaluation computes, defined once (after stylegan3's
``metrics/metric_main.py``). A metric family is one small module beside this one:

=======================  ==================  ===========================  ===============================
metric                   net (setting)       input                        computed from
=======================  ==================  ===========================  ===============================
``fid_i3d``              I3D (i3d_weights)   ``i3d``: 224^2, crop|whole   Mixed_5c averaged, 1024-d
``fvd``                  I3D (i3d_weights)   ``fvd``: 224^2 whole, TF     time-averaged logits, 400-d
``fvd_styleganv``        StyleGAN-V I3D      ``fvd``                      logits (return_features), 400-d
``fid_resnext``          ResNeXt-101 32x4d   ``resnext101``: 112^2        layer4 averaged, 2048-d
``warping_error``        (ground-truth flow) frames, [-1, 1]              generated frames under the flow
``warping_error_real``   (ground-truth flow) frames, [-1, 1]              real frames under the flow
``tof``                  DIS or RAFT-small   uint8 frames                 generated vs real motion
=======================  ==================  ===========================  ===============================

The four Fréchet metrics (``fid.py``, ``fvd.py``) take 16-frame clips; each input is built once per clip
and shared by the nets that read it, and each net's trunk runs once per input. ``sizes`` other than the
protocol's are a test-only switch for slow CPUs: the protocol input is resized further. A metric whose
net has no weights is skipped (the service logs why). Metrics of random test weights carry the
``random_weights/`` prefix (:func:`metric_name`).
"""

from __future__ import annotations

from vid2vid.eval.feature_nets import RANDOM_WEIGHTS_PREFIX, SPECS
from vid2vid.eval.metrics import fid, fvd, tof, warping_error
from vid2vid.eval.metrics.spec import FeatureMetric, TemporalFamily, TemporalMetric
from vid2vid.eval.preprocess import SIZES

FEATURE_METRICS: dict[str, FeatureMetric] = {m.name: m for m in (
    fid.FID_I3D, fvd.FVD, fvd.FVD_STYLEGANV, fid.FID_RESNEXT)}
TEMPORAL_FAMILIES: tuple[TemporalFamily, ...] = (warping_error.FAMILY, tof.FAMILY)
TEMPORAL_METRICS: dict[str, TemporalMetric] = {m.name: m for f in TEMPORAL_FAMILIES for m in f.metrics}
TEMPORAL_COLUMNS: tuple[str, ...] = tuple(c for f in TEMPORAL_FAMILIES for c in f.columns)
# feature net -> the EvalConfig field holding its weights ("eval.i3d_weights" -> "i3d_weights")
NET_SETTINGS: dict[str, str] = {net: spec.config_key.removeprefix("eval.") for net, spec in SPECS.items()}

if set(FEATURE_METRICS) & set(TEMPORAL_METRICS) or set(FEATURE_METRICS) & set(TEMPORAL_COLUMNS):
    raise RuntimeError("metric registry: a name is defined twice")


def metric_name(base: str, random_weights: bool) -> str:
    """MLflow name of a metric: ``base`` for real weights, ``random_weights/<base>`` otherwise.

    Metrics from random feature nets only prove the pipeline runs; the prefix puts them in their own
    MLflow group, so they can never be read (or plotted, or compared) as a real FID.
    """
    return f"{RANDOM_WEIGHTS_PREFIX}{base}" if random_weights else base


def metrics_for(nets: set[str], sizes: dict[str, int] | None = None) -> list[FeatureMetric]:
    """The Fréchet metrics the given nets produce at these input sizes (e.g. no FVD below 193 px)."""
    sizes = {**SIZES, **(sizes or {})}
    return [m for m in FEATURE_METRICS.values() if m.net in nets and sizes[m.view] >= m.min_input]


def too_small(nets: set[str], sizes: dict[str, int]) -> dict[str, str]:
    """eval/<metric> -> why, for each metric whose net runs but whose input is below its minimum."""
    return {f"eval/{m.name}": m.too_small.format(min=m.min_input, size=sizes[m.view])
            for m in FEATURE_METRICS.values() if m.net in nets and sizes[m.view] < m.min_input}
