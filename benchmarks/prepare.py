"""Scaling of the prepare pipeline: frames/s with 2 actors (Ray CPUs) over 1, against the machine's own bound
for the same work.

Work: the Cityscapes sample in ``$VID2VID_SAMPLE_DATA`` (4 sequences x 30 frames, 2048x1024 JPEG +
label + instance PNGs), each sequence linked ``copies`` times under new names so that the pipeline's
fixed costs (listing, Ray Data start-up, the actors' construction) are amortised; prepared at 512x256
into 30-frame clips with DIS flow (one shard task per sequence).

Timed regions, run interleaved in rounds (ABBA order, so drift lands on both sides):
- ``ray N``: one ``prepare()`` call with ``data.flow_actors=N`` on one local Ray of 2 CPUs, started
  once (its start is not counted; listing, the Ray Data pipeline, the actors' start-up and warm-up,
  every task and the manifest are); each actor holds 1 CPU, OpenCV and torch pinned to 1 thread.
- ``plain N``: the machine's bound for the same work, no Ray: N forked processes, each building the
  same shard worker and running its share of the same shard tasks (1 OpenCV thread each); timed from a
  barrier all of them passed to the last one's end. ``plain 2 / plain 1`` is what 2 cores give this
  work on this machine (memory bandwidth, shared caches, frequency and whatever else runs).

Threads: 1 per actor or process. Prints per side medians with quartiles, the split of task time, the
Ray speed-up and the bound per round, and ``ratio prepare_speedup`` against the bar: >= 1.8x, or
within 10% of the measured bound when the machine cannot give 1.8x.

    .venv/bin/python benchmarks/prepare.py
    .venv/bin/python benchmarks/prepare.py copies=4 rounds=3 resolution=256x128

Any other ``key=value`` sets a ``DataConfig`` field. Shards go to a temporary folder.
"""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import Summary, paired_ratios, print_ratio  # noqa: E402

from vid2vid.config import DataConfig, apply_mapping, parse_overrides  # noqa: E402
from vid2vid.datasets import prepare as pipeline  # noqa: E402

SAMPLE_ENV = "VID2VID_SAMPLE_DATA"  # the folder holding cityscapes_sample/ (README: Data)
FOLDERS = ("train_A", "train_B", "train_inst")


def sample() -> Path:
    if not os.environ.get(SAMPLE_ENV):
        sys.exit(f"set {SAMPLE_ENV} to the folder holding cityscapes_sample/ (see the README's Data section)")
    return Path(os.environ[SAMPLE_ENV]) / "cityscapes_sample"


def linked_source(src: Path, dst: Path, copies: int) -> Path:
    """``src``'s training sequences, each linked ``copies`` times as ``<name>_c<k>``."""
    for folder in FOLDERS:
        for seq in sorted((src / folder).iterdir()):
            for k in range(copies):
                (dst / folder).mkdir(parents=True, exist_ok=True)
                (dst / folder / f"{seq.name}_c{k}").symlink_to(seq.resolve(), target_is_directory=True)
    return dst


def ray_run(cfg: DataConfig, actors: int) -> pipeline.PrepareSummary:
    return pipeline.prepare(dataclasses.replace(cfg, flow_actors=actors), progress=False)


def _plain_process(cfg, kind, settings, out, tasks, barrier, q) -> None:
    worker = pipeline._ShardWorker(cfg, kind, settings, out)  # pins 1 thread outside Ray, warms up
    barrier.wait()
    t0 = time.perf_counter()
    frames = sum(worker.run(t, t.to_json())["frames"] for t in tasks)
    q.put((t0, time.perf_counter(), frames))


def plain_run(cfg: DataConfig, processes: int) -> tuple[float, int]:
    """(seconds, frames) of the shard tasks of ``cfg`` split over ``processes`` forked processes."""
    source = pipeline.make_source(cfg)
    listing, _ = pipeline.with_val_split(cfg, source.kind, source.list())
    tasks, _ = pipeline.plan(listing.sequences, cfg)
    settings = pipeline._settings(cfg, source.kind, source)
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_plain_process, args=(cfg, source.kind, settings, cfg.out, tasks[i::processes],
                                                      barrier, q)) for i in range(processes)]
    for p in procs:
        p.start()
    got = [q.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    return max(e for _, e, _ in got) - min(s for s, _, _ in got), sum(f for _, _, f in got)


def main(argv: list[str]) -> int:
    overrides = parse_overrides(argv)
    import ray

    copies, rounds = int(overrides.pop("copies", 2)), int(overrides.pop("rounds", 2))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        source = linked_source(sample(), Path(tmp) / "source", copies)
        base = {"source": str(source), "resolution": "512x256", "clip_len": 30, "flow": "dis",
                "overwrite": True, "val_fraction": 0.0, **overrides}
        cfg = apply_mapping(DataConfig(), {**base, "out": f"{tmp}/out"})
        sides = {"ray 1": lambda: ray_run(cfg, 1), "ray 2": lambda: ray_run(cfg, 2),
                 "plain 1": lambda: plain_run(cfg, 1), "plain 2": lambda: plain_run(cfg, 2)}
        print(f"{4 * copies} sequences x 30 frames (the sample, each linked {copies}x), {cfg.resolution}, "
              f"clips of {cfg.clip_len}, flow {cfg.flow}; 1 thread per actor/process; {rounds} rounds ABBA",
              flush=True)
        fps: dict[str, list[float]] = {name: [] for name in sides}
        stages: dict[str, list[dict]] = {"ray 1": [], "ray 2": []}
        for r in range(rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                out = sides[name]()
                if name.startswith("ray"):
                    fps[name].append(out.frames_per_second)
                    stages[name].append(out.seconds)
                else:
                    fps[name].append(out[1] / out[0])
                print(f"  round {r + 1} {name}: {fps[name][-1]:.2f} frames/s", flush=True)
    ray.shutdown()
    for name, values in fps.items():
        print(f"{name:<8} {Summary.of(values).format(' frames/s', digits=2)}")
    for name, runs in stages.items():
        task = {k: sum(s[k] for s in runs) / len(runs) for k in ("decode", "resize", "flow", "write")}
        total = sum(s["total"] for s in runs) / len(runs)
        split = ", ".join(f"{k} {v:.1f}s" for k, v in task.items())
        print(f"{name}: mean wall {total:.1f}s; task time (summed over actors) {sum(task.values()):.1f}s: {split}")
    speedup = paired_ratios(fps["ray 2"], fps["ray 1"])
    bound = paired_ratios(fps["plain 2"], fps["plain 1"])
    print(f"Ray 2 actors / 1 actor, per round: {speedup.format('x', digits=2)}")
    print(f"machine bound (plain 2 processes / 1), per round: {bound.format('x', digits=2)}")
    print(f"Ray speed-up / bound: {speedup.median / bound.median:.2f}")
    return 0 if print_ratio("prepare_speedup", speedup.median, f">= {min(1.8, 0.9 * bound.median):.2f}") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
