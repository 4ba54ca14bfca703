"""tOF (TecoGAN): how differently the generated video moves from the real one (``temporal.tof_terms``),
the mean over frame pairs of all clips of the end-point distance between their flows, in pixels."""

from __future__ import annotations

from vid2vid.eval.metrics.spec import ClipSample, TemporalFamily, TemporalMetric
from vid2vid.eval.temporal import tof_terms


def measure(s: ClipSample) -> dict[str, float]:
    if s.flow is None:
        return {"tof": 0.0, "tof_pairs": 0.0}
    total, pairs = tof_terms(s.fake_u8, s.real_flows, s.real_valid, s.flow)
    return {"tof": total, "tof_pairs": float(pairs)}


FAMILY = TemporalFamily(
    columns=("tof", "tof_pairs"),
    measure=measure,
    metrics=(TemporalMetric("tof", "tof", "tof_pairs", undefined="no frame pair with a real flow to compare with"),),
)
