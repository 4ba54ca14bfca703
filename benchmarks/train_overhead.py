"""Overhead of the platform: the same smoke model and the same clips, one step as plain PyTorch
(torch.optim.Adam, no Ray) vs one step inside Ray Train + DeepSpeed (one worker, gloo), measured in
the same run. Prints median step times, the ratio, and the Ray run's end-to-end wall time.

    .venv/bin/python benchmarks/train_overhead.py [steps=12]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import ray
import torch

from vid2vid.config import load_config
from vid2vid.datasets.prepare import prepare
from vid2vid.datasets.shards import iter_clips
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.step import PlainEngine, colocated_step
from vid2vid.platform.trainer import train


def plain_steps(cfg, shards: Path, steps: int) -> list[float]:
    torch.set_num_threads(1)  # what a Ray Train worker holding one CPU gets (OMP_NUM_THREADS=1)
    torch.manual_seed(cfg.train.seed)
    g, d = GeneratorSide(cfg.model), DiscriminatorSide(cfg.model)
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999)), cfg.train.grad_clip)
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=cfg.train.lr, betas=(0.5, 0.999)), cfg.train.grad_clip)
    objective, rng = Objective(cfg.model), torch.Generator().manual_seed(0)
    clips = list(iter_clips(shards, "train"))
    times = []
    for i in range(steps):
        clip = clips[i % len(clips)]
        t0 = time.perf_counter()
        colocated_step(ge, de, objective, cfg.model, clip, min(cfg.train.n_frames_total, clip.num_frames), rng)
        times.append(time.perf_counter() - t0)
    return times[2:]  # drop warm-up steps


def ray_steps(cfg, shards: Path) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    result = train(cfg, shards)
    wall = time.perf_counter() - t0
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    hist = sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, "step_time_s"))
    return [v for _, v in hist][2:], wall


def main(argv: list[str]) -> None:
    steps = int(dict(a.split("=", 1) for a in argv).get("steps", 12))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(["preset=smoke", f"data.out={tmp}/shards", f"train.run_dir={tmp}/runs",
                           f"train.max_steps={steps}", "train.niter=50", "train.cpus_per_worker=1"])
        prepare(cfg.data, progress=False)
        plain = plain_steps(cfg, Path(cfg.data.out), steps)
        ray_t, wall = ray_steps(cfg, Path(cfg.data.out))
    p, r = statistics.median(plain), statistics.median(ray_t)
    print(f"smoke model, {cfg.data.resolution}, {cfg.train.n_frames_total} frames/step, {steps} steps "
          f"(first 2 dropped), 1 CPU thread each")
    print(f"plain PyTorch step        : {p * 1000:8.1f} ms (median)")
    print(f"Ray Train + DeepSpeed step: {r * 1000:8.1f} ms (median)")
    print(f"ratio Ray+DeepSpeed / plain: {r / p:.2f}")
    print(f"Ray run end to end (start-up, data, {steps} steps, checkpoint, sample video): {wall:.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
