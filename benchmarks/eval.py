"""The evaluation service against a plain single-process loop doing the same work, on the same CPUs.

One run: synthetic shards with ``clips`` validation sequences of 16 frames at ``resolution``, a tiny
untrained smoke checkpoint and seeded random I3D and ResNeXt-101 weights in their public formats
(throughput does not depend on the weights' values; metrics go to a throw-away SQLite run as
random_weights/*), on a local Ray with ``cpus`` CPUs. Both sides evaluate the same clips the same way:
generate every clip, warping error and tOF, FID-I3D (crop), FVD (whole frame) and FID-ResNeXt
features, then the three Fréchet distances with their bootstrap intervals. The real statistics are
cached beforehand for both (the case of every checkpoint but the first: real clips pass through the
nets once per dataset), so neither side pays for them.

- service: ``evaluate_checkpoint`` (Ray Data pool of fused actors, one per CPU, one torch thread each);
- plain: the same per-clip code (``EvaluateClips``) called batch by batch in this process with ``cpus``
  torch threads, then the same Fréchet step: no Ray, no actors, no MLflow. It runs half its clips
  before the service and half after (plain, service, plain), so machine drift lands on both sides.

Timed regions: service work = its Ray Data pipeline minus the actors' start-up (generation, features,
per-clip metrics, scheduling), plus its Fréchet step; plain work = the batches, plus its Fréchet step.

Fixed costs (Ray Data and actor start-up, loading the nets, MLflow) are printed apart; the ratio is
plain seconds / service seconds for the per-clip work plus the Fréchet step (1.0 = no overhead), with
the end-to-end ratio beside it; the closing line is ``ratio eval_service_vs_plain: X (bar >= 0.9)``.
Also timed in the same run: one 2048-d Fréchet distance the old way
(``scipy.linalg.sqrtm`` of S1 S2) and the new way (symmetric eigen form).

    .venv/bin/python benchmarks/eval.py                       # 64 clips, 2 CPUs, ~5 minutes on 2 cores
    .venv/bin/python benchmarks/eval.py clips=8 cpus=2 resolution=256x128
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import Summary, print_ratio  # noqa: E402

from vid2vid.config import EvalConfig, load_config, parse_overrides, to_dict  # noqa: E402

BAR = 0.9


def setup(tmp: Path, clips: int, frames: int, resolution: str):
    from vid2vid.datasets.prepare import prepare
    from vid2vid.eval.feature_nets import save_random_weights
    from vid2vid.models.vid2vid import GeneratorSide
    from vid2vid.platform.tracking import Tracker

    cfg = load_config(["preset=smoke", "data.synthetic_sequences=1", f"data.synthetic_val_sequences={clips}",
                       f"data.synthetic_frames={frames}", f"data.clip_len={frames}", f"data.resolution={resolution}",
                       f"data.out={tmp / 'shards'}", f"train.run_dir={tmp}"])
    prepare(cfg.data, progress=False)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    tracker = Tracker(uri, "eval-benchmark", run_name="benchmark", run_dir=tmp)
    ckpt = tmp / "ray" / "benchmark" / "checkpoint_000000"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt.parent / "mlflow_run_id.txt").write_text(tracker.run_id)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    w = tmp / "weights"
    ev = EvalConfig(num_clips=clips, clip_len=frames, batch_size=2, allow_random_weights=True, bootstrap=500,
                    i3d_weights=str(save_random_weights("i3d", w / "rgb_imagenet.pt")),
                    resnext_weights=str(save_random_weights("resnext101", w / "resnext-101-kinetics.pth")),
                    stats_cache_dir=str(tmp / "eval_stats"))
    return ckpt, uri, ev


def work_spec(ckpt: Path, shards: Path, ev: EvalConfig):
    """What the service would run: its plan, worker spec and cache keys (the service's own functions)."""
    from vid2vid.datasets.shards import load_manifest
    from vid2vid.eval import service
    from vid2vid.eval.clips import plan_clips
    from vid2vid.eval.metric_utils import FAKE
    from vid2vid.eval.metrics import metrics_for
    from vid2vid.eval.preprocess import SIZES
    from vid2vid.eval.worker import WorkerSpec

    plan = plan_clips(shards, ev.num_clips, ev.clip_len, ev.split)
    nets, _ = service.select_nets(ev)
    metrics = metrics_for(set(nets))
    keys = service._cache_keys(shards, load_manifest(shards), plan, metrics, nets, SIZES, ev.fid_frame)
    spec = WorkerSpec(str(ckpt), {n: s.ref for n, s in nets.items()}, [m.name for m in metrics], [], SIZES,
                      ev.fid_frame, [FAKE], None, 0, service._tof_flow(load_manifest(shards)),
                      expect_random={n: s.random for n, s in nets.items()})
    return plan, nets, metrics, keys, spec


def cache_real_stats(metrics, keys, cache_dir: Path) -> None:
    """Stand-in real statistics under the service's own cache keys: full-rank, finite, seeded."""
    from vid2vid.eval.frechet import GaussianStats, save_stats

    rng = np.random.default_rng(0)
    for m in metrics:
        a = rng.normal(size=(m.dim, m.dim)) / np.sqrt(m.dim)
        stats = GaussianStats(rng.normal(size=m.dim), a @ a.T + 0.1 * np.eye(m.dim), 10_000)
        save_stats(cache_dir / f"{keys[m.name]}.npz", stats, keys[m.name])


class PlainLoop:
    """The same work in this process, no Ray: ``run(batches)`` extracts, ``finish()`` takes the Fréchet
    step over everything run so far. Run in two halves around the service, so drift lands on both
    sides of the comparison (the halves' mean time is what the service's time is compared with)."""

    def __init__(self, ckpt: Path, shards: Path, ev: EvalConfig, cpus: int):
        from vid2vid.eval.metric_utils import Totals
        from vid2vid.eval.worker import EvaluateClips

        self.plan, self.nets, self.metrics, self.keys, self.spec = work_spec(ckpt, shards, ev)
        self.spec.threads = cpus
        self.ev = ev
        t0 = time.perf_counter()
        self.worker = EvaluateClips(self.spec)
        self.fixed = time.perf_counter() - t0
        self.totals = Totals()
        self.batch_s: list[float] = []  # seconds of each batch of ev.batch_size clips

    def batches(self) -> list[range]:
        n, b = len(self.plan.segments), self.ev.batch_size
        return [range(start, min(start + b, n)) for start in range(0, n, b)]

    def run(self, batches: list[range]) -> float:
        from vid2vid.eval.clips import encode_segment

        t0 = time.perf_counter()
        for idx in batches:
            t = time.perf_counter()
            segments = np.array([encode_segment(self.plan.segments[i]) for i in idx])
            self.totals.add(self.worker({"index": np.array(list(idx)), "segment": segments}), self.spec.metrics)
            self.batch_s.append(time.perf_counter() - t)
        return time.perf_counter() - t0

    def finish(self) -> tuple[float, dict]:
        """(Fréchet seconds, metrics)."""
        from vid2vid.eval.metric_utils import FAKE, frechet_values, temporal_values

        t0 = time.perf_counter()
        values = frechet_values(self.totals, self.metrics, [FAKE], self.keys, Path(self.ev.stats_cache_dir),
                                {n: s.random for n, s in self.nets.items()}, self.ev.bootstrap).values
        values.update(temporal_values(self.totals, [FAKE], {}))
        return time.perf_counter() - t0, values


def frechet_2048(repeats: int = 1) -> tuple[float, float, float]:
    """(seconds the old way, seconds the new way, relative difference) on full-rank 2048-d statistics."""
    import scipy.linalg

    from vid2vid.eval.frechet import GaussianStats, frechet_distance

    rng = np.random.default_rng(1)
    d = 2048
    stats = []
    for shift in (0.0, 0.05):
        a = rng.normal(size=(d, d)) / np.sqrt(d)
        stats.append(GaussianStats(rng.normal(size=d) * 0.1 + shift, a @ a.T + 0.05 * np.eye(d), 4 * d))
    a, b = stats
    t0 = time.perf_counter()
    for _ in range(repeats):
        root = scipy.linalg.sqrtm(a.cov @ b.cov).real
        old = float(((a.mean - b.mean) ** 2).sum() + np.trace(a.cov) + np.trace(b.cov) - 2 * np.trace(root))
    t1 = time.perf_counter()
    for _ in range(repeats):
        new = frechet_distance(a, b)
    t2 = time.perf_counter()
    return (t1 - t0) / repeats, (t2 - t1) / repeats, abs(new - old) / abs(old)


def main(argv: list[str]) -> int:
    import ray

    from vid2vid.platform.evaluation import evaluate_and_log

    opts = {"clips": 64, "frames": 16, "resolution": "128x64", "cpus": 2, **parse_overrides(argv)}
    clips, frames, cpus = int(opts["clips"]), int(opts["frames"]), int(opts["cpus"])
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("vid2vid").setLevel(logging.ERROR)  # the small-N warnings are expected at 64 clips
    torch.set_num_threads(cpus)
    old_s, new_s, rel = frechet_2048()
    print(f"2048-d Fréchet distance: {old_s:.1f}s before (scipy.linalg.sqrtm of S1 S2), {new_s:.2f}s after "
          f"(symmetric form: Cholesky factor + eigvalsh), {old_s / new_s:.1f}x; relative difference {rel:.1e}",
          flush=True)
    t_start = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    import ray.data

    ray.data.DataContext.get_current().enable_progress_bars = False
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        ckpt, uri, ev = setup(tmp, clips, frames, str(opts["resolution"]))
        _, _, metrics, keys, _ = work_spec(ckpt, tmp / "shards", ev)
        cache_real_stats(metrics, keys, Path(ev.stats_cache_dir))
        print(f"{clips} clips x {frames} frames at {opts['resolution']}: generation, warping error, tOF, FID-I3D + "
              f"FVD (I3D twice: crop and whole frame) + FID-ResNeXt, Fréchet with {ev.bootstrap} bootstrap "
              f"resamples; {cpus} CPUs; real statistics cached (setup {time.perf_counter() - t_start:.0f}s)",
              flush=True)
        plain = PlainLoop(ckpt, tmp / "shards", ev, cpus)
        batches = plain.batches()
        half = len(batches) // 2
        p_first = plain.run(batches[:half])  # plain, first half of the clips
        torch.set_num_threads(cpus)
        res = evaluate_and_log(ckpt, tmp / "shards", ev, step=1, tracking_uri=uri, cpus_per_actor=1.0)
        torch.set_num_threads(cpus)
        p_second = plain.run(batches[half:])  # plain, second half
        p_frechet, p_values = plain.finish()
        ray.shutdown()

    t = res.timings
    s_fixed = t["setup"] + t["actor_startup"] + t["mlflow"]
    s_work = t["pipeline"] - t["actor_startup"]
    p_work = p_first + p_second
    print(f"  service    : fixed {s_fixed:.1f}s (setup {t['setup']:.1f}s, actor start-up {t['actor_startup']:.1f}s, "
          f"mlflow {t['mlflow']:.1f}s) | work {s_work:.1f}s ({res.num_clips / s_work:.3f} clips/s, Ray Data "
          f"scheduling included) + Fréchet {t['frechet']:.1f}s")
    print(f"  plain loop : fixed {plain.fixed:.1f}s (load generator + nets) | work {p_work:.1f}s "
          f"({res.num_clips / p_work:.3f} clips/s; {p_first:.1f}s before the service, {p_second:.1f}s after; "
          f"per batch of {ev.batch_size} {Summary.of(plain.batch_s).format('s', digits=2)}) + Fréchet {p_frechet:.1f}s")
    print("  real-statistics pass: cached for both sides (stand-in statistics under the service's cache keys), "
          "not timed")
    assert res.real_clips_extracted == 0, "the real statistics were meant to be cached"
    for k, v in p_values.items():  # the same numbers, or the comparison would be of different work
        assert np.isclose(res.metrics[k], v, rtol=1e-3), (k, res.metrics[k], v)
    ratio = (p_work + p_frechet) / (s_work + t["frechet"])
    end_to_end = (plain.fixed + p_work + p_frechet) / res.seconds
    print(f"  both computed the same {len(p_values)} numbers (rtol 1e-3); end to end with fixed costs: "
          f"plain / service = {end_to_end:.2f}")
    return 0 if print_ratio("eval_service_vs_plain", ratio, f">= {BAR}") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
