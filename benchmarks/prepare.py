"""Throughput of the prepare pipeline: frames/s with 1 and with 2 Ray CPUs, and where the time goes.

Prepares the Cityscapes sample in ``$VID2VID_SAMPLE_DATA`` (4 sequences x 30 frames, 2048x1024 JPEG + label + instance
PNGs) at 512x256 into 30-frame clips with DIS flow, once per CPU count, each on a fresh local Ray
instance (Ray's own start-up is not counted; the pipeline's actor start-up is). Prints frames/s, the
speed-up of the largest CPU count over the smallest, and the split of task time between decode,
resize, flow and write.

    .venv/bin/python benchmarks/prepare.py
    .venv/bin/python benchmarks/prepare.py cpus=1,2 resolution=256x128 flow=raft raft_weights=...

Any other ``key=value`` sets a ``DataConfig`` field. Shards go to a temporary folder.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from vid2vid.config import DataConfig, apply_mapping, parse_overrides
from vid2vid.datasets.prepare import prepare

REPO = Path(__file__).resolve().parent.parent
SAMPLE_ENV = "VID2VID_SAMPLE_DATA"  # the folder holding cityscapes_sample/ (README: Data)


def sample() -> Path:
    if not os.environ.get(SAMPLE_ENV):
        sys.exit(f"set {SAMPLE_ENV} to the folder holding cityscapes_sample/ (see the README's Data section)")
    return Path(os.environ[SAMPLE_ENV]) / "cityscapes_sample"


def run(cfg: DataConfig, cpus: int):
    import ray

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        return prepare(cfg, progress=False)
    finally:
        ray.shutdown()


def main(argv: list[str]) -> None:
    overrides = parse_overrides(argv)
    cpu_counts = [int(c) for c in str(overrides.pop("cpus", "1,2")).split(",")]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    with tempfile.TemporaryDirectory() as tmp:
        base = {"source": str(sample()), "resolution": "512x256", "clip_len": 30, "flow": "dis",
                "overwrite": True, **overrides}
        results = {}
        for cpus in cpu_counts:
            cfg = apply_mapping(DataConfig(), {**base, "out": f"{tmp}/cpus{cpus}"})
            s = run(cfg, cpus)
            results[cpus] = s
            task = sum(s.seconds[k] for k in ("decode", "resize", "flow", "write"))
            split = ", ".join(f"{k} {s.seconds[k]:.1f}s ({100 * s.seconds[k] / task:.0f}%)"
                              for k in ("decode", "resize", "flow", "write"))
            print(f"{cpus} Ray CPU(s): {s.frames} frames, {sum(s.clips.values())} clips of {cfg.clip_len} "
                  f"at {cfg.resolution} in {s.seconds['total']:.1f}s = {s.frames_per_second:.2f} frames/s")
            print(f"  task time {task:.1f}s: {split}")
            print(f"  listing {s.seconds['list']:.2f}s; rejected {len(s.rejected)}")
        lo, hi = min(results), max(results)
        if hi != lo:
            ratio = results[hi].frames_per_second / results[lo].frames_per_second
            print(f"speed-up {hi} vs {lo} Ray CPUs: {ratio:.2f}x (ideal {hi / lo:.0f}x)")


if __name__ == "__main__":
    main(sys.argv[1:])
