"""Overhead of the platform (Ray Train + Ray Data + DeepSpeed + MLflow) against plain PyTorch, both
measured in ONE Ray Train worker, interleaved, on the same 4-frame clips of the smoke model.

Shapes: smoke preset (ngf 16, 1 spatial scale), 128x64, batch 1, 4 frames generated per step (the
progressive schedule is fixed at 4 frames for the measurement: n_frames_total = max_frames_total = 4).
Threads: the worker holds 1 Ray CPU, so torch runs 1 thread (Ray sets OMP_NUM_THREADS=1) on both
sides; Ray Data streams the platform's clips with the other CPU of a 2-CPU local Ray.

1. Steps, paired: the platform's step (two DeepSpeed ZeRO-1 engines built by the worker's own
   ``setup``) and a plain step (the same modules, same seeds, ``torch.optim.Adam``), alternating
   (ABBA) on the same clip. Timed: ``colocated_step`` alone (forward, backward, optimizer steps).
2. The loop, interleaved by interval: an interval is ``steps`` training steps and the checkpoint
   that ends them (``train.checkpoint_every=steps``).
   - platform: the worker's real ``generator_loop`` over the Ray Data shard: data wait, step, metrics,
     ``ray.train.report`` at most every ``train.report_every_s`` (default 10 s) and with the
     checkpoint (DeepSpeed save, upload into the run's storage), the wait for Ray to commit it, and
     the MLflow log of the interval's metrics (rank 0 logs them once committed);
   - plain: the same number of steps reading clips from the same Parquet shards in-process, one
     MLflow ``log_batch`` per step, ``torch.save`` of both modules and optimizers at the end.
   The loop runs platform, plain, platform, plain, ...: each platform interval but the first is
   compared with the mean of the plain intervals on either side of it (linear drift cancels). The
   first platform interval also starts the Ray Data epoch (its pipeline's start-up is the first data
   wait); it is printed, not counted.

    .venv/bin/python benchmarks/train_overhead.py
    .venv/bin/python benchmarks/train_overhead.py steps=20 intervals=5 pairs=12 report_every_s=0
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
# Ray workers inherit this process's environment: they find timing.py (and the repo) through it.
os.environ["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(BENCH.parent), os.environ.get("PYTHONPATH", "")])

from timing import Summary, interleaved, paired_ratios, print_ratio  # noqa: E402

from vid2vid.config import parse_overrides  # noqa: E402


class PlainLoop:
    """What a user writes without the platform: the same modules and step, torch Adam, clips read
    from the shards in this process, MLflow per step, a torch.save checkpoint at the end."""

    def __init__(self, cfg, shards: str, tracking_uri: str, experiment: str, out: str):
        import torch
        from mlflow.tracking import MlflowClient

        from vid2vid.models.objective import Objective
        from vid2vid.training.engine import PlainEngine
        from vid2vid.training.sides import build_sides

        g, d = build_sides(cfg, "both", torch.device("cpu"))
        adam = lambda m: torch.optim.Adam(m.parameters(), lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2))  # noqa: E731
        self.g = PlainEngine(g, adam(g), cfg.train.grad_clip)
        self.d = PlainEngine(d, adam(d), cfg.train.grad_clip)
        self.cfg, self.shards, self.out = cfg, shards, Path(out)
        self.objective, self.rng = Objective(cfg.model), torch.Generator().manual_seed(cfg.train.seed)
        self.client = MlflowClient(tracking_uri)
        self.run_id = self.client.create_run(self.client.get_experiment_by_name(experiment).experiment_id,
                                             run_name="plain-loop").info.run_id
        self.clips = self._clips()
        self.step_count = 0
        self.parts: dict[str, list[float]] = {"data": [], "steps": [], "mlflow": [], "save": []}

    def _clips(self):
        from vid2vid.datasets.shards import iter_clips

        while True:  # epochs
            yield from iter_clips(self.shards, "train")

    def step(self, clip) -> dict[str, float]:
        from vid2vid.training.step import colocated_step

        r = colocated_step(self.g, self.d, self.objective, self.cfg.model, clip, self.cfg.train.n_frames_total,
                           self.rng)
        return {**r.generator.scalars("G/"), **r.discriminator.scalars("D/")}

    def interval(self, steps: int) -> float:
        import torch
        from mlflow.entities import Metric

        parts = dict.fromkeys(self.parts, 0.0)
        t_start = time.perf_counter()
        for _ in range(steps):
            t0 = time.perf_counter()
            clip = next(self.clips)
            t1 = time.perf_counter()
            metrics = self.step(clip)
            t2 = time.perf_counter()
            self.step_count += 1
            metrics["step_time_s"] = t2 - t1
            now = int(time.time() * 1000)
            self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, self.step_count)
                                                        for k, v in metrics.items()])
            parts["data"] += t1 - t0
            parts["steps"] += t2 - t1
            parts["mlflow"] += time.perf_counter() - t2
        t0 = time.perf_counter()
        torch.save({"generator": self.g.module.state_dict(), "discriminator": self.d.module.state_dict(),
                    "g_optimizer": self.g.optimizer.state_dict(), "d_optimizer": self.d.optimizer.state_dict()},
                   self.out / "plain-checkpoint.pt")
        parts["save"] = time.perf_counter() - t0
        for k, v in parts.items():
            self.parts[k].append(v)
        return time.perf_counter() - t_start


def measure(payload, bench: dict) -> None:
    """The Ray Train worker (``payload``: the platform's WorkerPayload): paired steps, then the
    platform's loop with a plain interval after each checkpoint commit. Writes its timings to
    ``bench["out"]/timings.json``."""
    import torch

    from vid2vid.datasets.shards import iter_clips
    from vid2vid.platform import worker
    from vid2vid.platform.tracking import CommittedMetrics, Tracker
    from vid2vid.training.step import colocated_step

    cfg = payload.train_config()
    wc = worker.setup(cfg)
    state = worker.restore(wc, None)
    wc.clip_len = payload.clip_len
    identity = payload.tracking
    plain = PlainLoop(cfg, bench["shards"], identity["uri"], identity["experiment"], bench["out"])
    n = cfg.train.n_frames_total

    # 1. steps, paired on the same clips
    clips = list(itertools.islice(iter_clips(bench["shards"], "train"), 4))
    order = {side: itertools.cycle(clips) for side in ("platform", "plain")}
    rng = torch.Generator().manual_seed(cfg.train.seed)
    g, d = wc.engines["generator"], wc.engines["discriminator"]
    steps = interleaved({
        "platform": lambda: colocated_step(g, d, wc.objective, cfg.model, next(order["platform"]), n, rng),
        "plain": lambda: plain.step(next(order["plain"])),
    }, rounds=bench["pairs"], warmup=2)

    # 2. the loop, interval by interval
    timed_report = worker.report
    spent = {"report": 0.0}

    def report(*args, **kwargs):  # the worker's own report, timed (generator_loop looks it up here)
        t0 = time.perf_counter()
        timed_report(*args, **kwargs)
        spent["report"] += time.perf_counter() - t0

    worker.report = report

    class Intervals(CommittedMetrics):
        """Rank 0's committed metrics, as in a run; after each commit (the end of an interval), a plain
        interval runs."""

        def __init__(self, tracker):
            super().__init__(tracker)
            self.platform: list[dict[str, float]] = []
            self.plain_s: list[float] = []
            self.reset()

        def reset(self):
            spent["report"] = 0.0
            self.steps_s = 0.0
            self.start = time.perf_counter()

        def buffer(self, metrics, step, committed):
            self.steps_s += metrics["step_time_s"]
            super().buffer(metrics, step, committed)

        def commit(self):
            t0 = time.perf_counter()
            super().commit()
            end = time.perf_counter()
            total = end - self.start
            self.platform.append({"total": total, "steps": self.steps_s, "report": spent["report"],
                                  "commit": end - t0, "other": total - self.steps_s - spent["report"] - (end - t0)})
            self.plain_s.append(plain.interval(bench["steps"]))
            self.reset()

    tracker = Intervals(Tracker.join(identity, writer="rank0"))
    worker.generator_loop(wc, state, tracker)
    Path(bench["out"], "timings.json").write_text(json.dumps(
        {"steps": steps, "platform": tracker.platform, "plain": tracker.plain_s, "plain_parts": plain.parts}))


def main(argv: list[str]) -> int:
    import ray

    from vid2vid.config import load_config
    from vid2vid.datasets.prepare import prepare
    from vid2vid.platform import trainer

    opts = {"steps": 20, "intervals": 4, "pairs": 8, **parse_overrides(argv)}  # ~3 min on 2 quiet cores
    steps, intervals, pairs = int(opts.pop("steps")), int(opts.pop("intervals")), int(opts.pop("pairs"))
    extra = [f"train.{k}={v}" for k, v in opts.items()]  # e.g. report_every_s=0
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        clips = steps * intervals + 2  # one epoch holds every interval: no epoch restarts inside them
        cfg = load_config(["preset=smoke", f"data.synthetic_sequences={(clips + 1) // 2}", "data.synthetic_frames=8",
                           "data.clip_len=4", f"data.out={tmp}/shards", f"train.run_dir={tmp}/runs",
                           "train.n_frames_total=4", "train.max_frames_total=4", "train.niter=100",
                           "train.niter_decay=0", f"train.checkpoint_every={steps}",
                           f"train.max_steps={steps * intervals}", "train.cpus_per_worker=1",
                           "train.run_name=overhead", *extra])
        prepare(cfg.data, progress=False)
        out = Path(tmp) / "out"
        out.mkdir()
        # the Ray Train workers run measure() instead of the worker loop: trainer.train looks its worker
        # function up when it builds the TorchTrainer, and Ray ships a function of __main__ by value
        original = trainer.train_worker
        trainer.train_worker = lambda payload: measure(payload, {"out": str(out), "steps": steps,
                                                                 "pairs": pairs, "shards": cfg.data.out})
        try:
            trainer.train(cfg, cfg.data.out)
        finally:
            trainer.train_worker = original
        t = json.loads((out / "timings.json").read_text())
    ray.shutdown()
    return report_results(cfg, t, steps, intervals, pairs)


def report_results(cfg, t: dict, steps: int, intervals: int, pairs: int) -> int:
    print(f"smoke model, {cfg.data.resolution}, batch 1, {cfg.train.n_frames_total} frames per step; one Ray Train "
          f"worker with 1 CPU (torch 1 thread on both sides); report_every_s={cfg.train.report_every_s}")
    step_ratio = paired_ratios(t["steps"]["platform"], t["steps"]["plain"])
    print(f"steps, {pairs} ABBA pairs on the same clips (timed: colocated_step):")
    for side in ("platform", "plain"):
        print(f"  {side:<8} step {Summary.of(t['steps'][side]).format(' ms', 1000, 0)}")
    print(f"  platform / plain per pair: {step_ratio.format('', digits=2)}")
    platform, plain = t["platform"], t["plain"]
    print(f"loop, intervals of {steps} steps ending in a checkpoint (platform, plain, platform, ...):")
    first = platform[0]
    print(f"  platform interval 1 (starts the Ray Data epoch; not counted): {first['total']:.1f} s")
    counted = platform[1:]
    for key in ("total", "steps", "report", "commit", "other"):
        what = {"total": "whole interval", "steps": "steps (colocated_step)",
                "report": "ray.train.report calls (checkpoint save + upload included)",
                "commit": "wait for Ray's commit + MLflow log of the interval",
                "other": "data wait, metrics, cadence"}[key]
        print(f"  platform {what:<58} {Summary.of([p[key] for p in counted]).format(' s', digits=2)}")
    for key, what in (("data", "clip reads"), ("steps", "steps (colocated_step)"),
                      ("mlflow", "MLflow log_batch per step"), ("save", "torch.save checkpoint")):
        print(f"  plain    {what:<58} {Summary.of(t['plain_parts'][key]).format(' s', digits=2)}")
    print(f"  plain    {'whole interval':<58} {Summary.of(plain).format(' s', digits=2)}")
    ratios = [p["total"] / ((plain[i - 1] + plain[i]) / 2) for i, p in enumerate(platform) if i > 0]
    loop = Summary.of(ratios)
    print(f"  platform / plain per interval (against the plain intervals on either side): {loop.format('', digits=2)}")
    print(f"step ratio platform / plain: {step_ratio.median:.2f} (the loop's ratio below is the promise)")
    return 0 if print_ratio("train_loop", loop.median, "<= 1.10") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
