"""Warping error: the generated frames under the ground-truth flow (``temporal.warping_error``).

Per clip, the error is weighted by its confidence mass, so the mean over clips equals the warping
error of all of them at once. ``warping_error_real`` is the same measure on the real frames: the floor
that occlusions and flow errors leave, logged beside it for scale.
"""

from __future__ import annotations

from vid2vid.eval.clips import warp_terms
from vid2vid.eval.metrics.spec import ClipSample, TemporalFamily, TemporalMetric


def measure(s: ClipSample) -> dict[str, float]:
    err, mass = warp_terms(s.fake, s.clip, s.i)
    err_real, _ = warp_terms(s.clip.frames, s.clip, s.i)
    return {"warp": err * mass, "warp_real": err_real * mass, "warp_mass": mass}


FAMILY = TemporalFamily(
    columns=("warp", "warp_real", "warp_mass"),
    measure=measure,
    metrics=(TemporalMetric("warping_error", "warp", "warp_mass",
                            undefined="the ground-truth flow confidence is zero on every evaluated frame"),
             TemporalMetric("warping_error_real", "warp_real", "warp_mass", per_kind=False)),
)
