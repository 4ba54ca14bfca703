"""Clips/s of the whole evaluation service against the bare feature-net forward on the same clips.

One run: synthetic shards (``clips`` sequences of ``frames`` frames at ``resolution``), a tiny
untrained smoke checkpoint and seeded random feature-net weights (throughput does not depend on the
weights' values; the metrics are logged as random_weights/* into a throw-away SQLite run), on a local
Ray with ``cpus`` CPUs. It times

- service, cold: ``evaluate_checkpoint`` end to end, real statistics not cached yet (real and
  generated clips go through the nets), split into setup / Ray Data pipeline / Fréchet / MLflow;
- service, warm: the same again, real statistics from the cache (the case of every checkpoint but
  the first);
- bare: the same uint8 clips (real and generated), preprocessed and forwarded through the same nets
  in this process with ``cpus`` torch threads: no Ray, no generation, no statistics.

and prints clips/s of each and the ratio service / bare (1.0 = no overhead at all).

    .venv/bin/python benchmarks/eval.py
    .venv/bin/python benchmarks/eval.py clips=8 nets=i3d cpus=2 resolution=256x128
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vid2vid.config import EvalConfig, load_config, parse_overrides, to_dict  # noqa: E402


def setup(tmp: Path, clips: int, frames: int, resolution: str, nets: list[str]):
    import json

    from vid2vid.datasets.prepare import prepare
    from vid2vid.eval.feature_nets import save_random_weights
    from vid2vid.models.vid2vid import GeneratorSide
    from vid2vid.platform.tracking import Tracker

    cfg = load_config(["preset=smoke", f"data.synthetic_sequences={clips}", f"data.synthetic_frames={frames}",
                       f"data.clip_len={frames}", f"data.resolution={resolution}", f"data.out={tmp / 'shards'}",
                       f"train.run_dir={tmp}"])
    prepare(cfg.data, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri, "eval-benchmark", run_name="benchmark", run_dir=tmp)
    ckpt = tmp / "ray" / "benchmark" / "checkpoint_000000"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt.parent / "mlflow_run_id.txt").write_text(tracker.run_id)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    ev = EvalConfig(num_clips=clips, clip_len=frames, batch_size=2, allow_random_weights=True)
    if "i3d" in nets:
        ev.i3d_weights = str(save_random_weights("i3d", tmp / "weights" / "rgb_imagenet.pt"))
    if "resnext101" in nets:
        ev.resnext_weights = str(save_random_weights("resnext101", tmp / "weights" / "resnext-101-kinetics.pth"))
    return cfg, ckpt, uri, ev


def bare_forward(ckpt: Path, shards: Path, ev: EvalConfig, cpus: int) -> tuple[float, int]:
    """Seconds of preprocess + forward of every net on the real and generated clips (made beforehand)."""
    from vid2vid.eval.clips import GenerateClips, encode_segment, plan_clips
    from vid2vid.eval.extract import frames_to_input
    from vid2vid.eval.feature_nets import load_feature_net
    from vid2vid.eval.preprocess import SIZES

    torch.set_num_threads(cpus)
    plan = plan_clips(shards, ev.num_clips, ev.clip_len)
    rows = GenerateClips(str(ckpt))({"index": np.arange(len(plan.segments)),
                                     "segment": np.array([encode_segment(s) for s in plan.segments])})
    frames = rows["frames"]
    seconds = 0.0
    for name, path in (("i3d", ev.i3d_weights), ("resnext101", ev.resnext_weights)):
        if path is None:
            continue
        net = load_feature_net(name, path)
        t = time.perf_counter()
        with torch.no_grad():
            for i in range(0, len(frames), ev.batch_size):
                h = net.trunk(frames_to_input(frames[i : i + ev.batch_size], name, SIZES[name]))
                h.mean(dim=(2, 3, 4))
                if name == "i3d":
                    net.logits_from_trunk(h)
        seconds += time.perf_counter() - t
    return seconds, len(frames)


def main(argv: list[str]) -> None:
    import ray

    from vid2vid.eval.service import evaluate_checkpoint

    opts = {"clips": 4, "frames": 16, "resolution": "128x64", "cpus": 2, "nets": "i3d,resnext101",
            **parse_overrides(argv)}
    clips, frames, cpus = int(opts["clips"]), int(opts["frames"]), int(opts["cpus"])
    nets = [n for n in str(opts["nets"]).split(",") if n]
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        cfg, ckpt, uri, ev = setup(tmp, clips, frames, str(opts["resolution"]), nets)
        runs = {}
        for label, step in (("cold", 1), ("warm", 2)):
            runs[label] = evaluate_checkpoint(ckpt, tmp / "shards", ev, step=step, tracking_uri=uri,
                                              cpus_per_actor=cpus / (1 + len(nets)))
        ray.shutdown()
        bare_s, bare_clips = bare_forward(ckpt, tmp / "shards", ev, cpus)

    n = runs["cold"].num_clips
    print(f"{n} clips x {runs['cold'].clip_frames} frames at {opts['resolution']}, nets {nets}, {cpus} CPUs")
    bare_rate = bare_clips / bare_s
    print(f"  bare forward : {bare_clips} clip passes (real + generated) per net in {bare_s:.1f}s = "
          f"{bare_rate:.3f} clips/s")
    for label, res in runs.items():
        t = res.timings
        rate = n / res.seconds
        passes = n + res.real_clips_extracted
        no_frechet = passes / (res.seconds - t["frechet"])
        print(f"  service {label:<5}: {n} clips ({passes} passes per net) in {res.seconds:.1f}s = {rate:.3f} clips/s "
              f"-> ratio {passes / res.seconds / bare_rate:.2f} of bare per pass "
              f"({no_frechet / bare_rate:.2f} without the Fréchet step)")
        print("      " + ", ".join(f"{k} {v:.1f}s" for k, v in t.items()))
        print("      " + ", ".join(f"{k}={v:.4g}" for k, v in sorted(res.metrics.items())))


if __name__ == "__main__":
    main(sys.argv[1:])
