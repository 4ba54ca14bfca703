"""The evaluation service: checkpoint -> validation clips -> video features -> metrics -> the training run.

:func:`evaluate_checkpoint` runs one Ray Data pipeline, streaming, memory-bounded:

    segments (metadata) -> GenerateClips actors (load the checkpoint once, generate, warping error)
                        -> ExtractFeatures("i3d") actors -> ExtractFeatures("resnext101") actors -> driver

Each stage is an actor pool (``ActorPoolStrategy``), with one GPU per actor when the cluster has a
GPU for every pool (shares of one otherwise, see :func:`_resources`), so both nets and the generator
run at the same time on different clips. The driver only folds
features into :class:`StreamingStats`. Metrics (protocol in ``extract.py``):

- ``eval/fid_i3d``, ``eval/fvd``, ``eval/fid_resnext``: Fréchet distances against real-clip
  statistics cached per (dataset, split + clip selection, resolution + input size, net, weights sha256)
  under ``eval.stats_cache_dir`` (default ``<run_dir>/eval_stats``): the real clips pass through the
  nets once, on the first evaluation, then never again;
- ``eval/warping_error``: generated frames under the ground-truth flow (``temporal.warping_error``),
  and ``eval/warping_error_real``, the same on the real frames: the floor that occlusions and
  flow errors leave, to read the first against.

Weights policy: a net without a weights file is skipped, and the log and a run tag say which file to
supply. Random test weights need ``eval.allow_random_weights=true``; their metrics are logged as
``random_weights/eval/...`` and the run is tagged ``eval/random_weights``.

Metrics land in THE TRAINING RUN, at the checkpoint's training step: the run id comes from the
argument, else from ``mlflow_run_id.txt`` that the trainer writes beside the checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vid2vid import storage
from vid2vid.config import EvalConfig
from vid2vid.datasets.shards import MANIFEST as SHARDS_MANIFEST
from vid2vid.datasets.shards import check_model_fits, load_manifest
from vid2vid.eval.clips import ClipPlan, GenerateClips, encode_segment, plan_clips
from vid2vid.eval.extract import FVD_MIN_SIZE, ExtractFeatures, feature_columns
from vid2vid.eval.feature_nets import SPECS, is_random_weights_file, metric_name, missing_weights_message
from vid2vid.eval.frechet import (
    StreamingStats,
    frechet_distance,
    load_or_compute_real_stats,
    sha256_file,
    stats_cache_key,
)
from vid2vid.eval.preprocess import SIZES
from vid2vid.platform.checkpoint import MANIFEST as CHECKPOINT_MANIFEST
from vid2vid.platform.checkpoint import read_manifest
from vid2vid.platform.tracking import RUN_ID_FILE, Tracker, read_run_id, resolve_tracking_uri
from vid2vid.platform.warm_start import load_config

log = logging.getLogger("vid2vid.eval")

METRICS = {"i3d": "eval/fid_i3d", "i3d_logits": "eval/fvd", "resnext101": "eval/fid_resnext"}
NETS = {"i3d": "i3d_weights", "resnext101": "resnext_weights"}  # net -> EvalConfig field
PROTOCOL = ("FID-I3D: I3D Mixed_5c pooled 1024-d; FVD: I3D time-averaged Kinetics logits 400-d; both 16 "
            "frames at 224x224. FID-ResNeXt: ResNeXt-101 32x4d layer4 pooled 2048-d, 16 frames at 112x112.")


@dataclass
class EvalResult:
    step: int
    split: str  # "val", or "train" when the shards have no val split
    num_clips: int
    clip_frames: int
    metrics: dict[str, float]  # MLflow names, e.g. "eval/fid_i3d" or "random_weights/eval/fid_i3d"
    skipped: dict[str, str]  # metric -> why it was not computed (e.g. which weights file to supply)
    random_weights: list[str]  # nets that ran on random test weights
    run_id: str | None
    tracking_uri: str | None
    real_clips_extracted: int  # real clips that went through the nets (0: all statistics cached)
    seconds: float
    tags: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: setup, pipeline, frechet, mlflow


@dataclass(frozen=True)
class RunTarget:
    run_id: str | None
    tracking_uri: str
    run_dir: Path  # the training run_dir: default tracking store and statistics cache live there


@dataclass(frozen=True)
class NetSpec:
    path: str
    sha256: str
    random: bool
    size: int  # input size (the protocol's unless a test overrides it)


# ------------------------------------------------------------------------------------------------
# Where the results go


def checkpoint_step(checkpoint_dir: str | Path, step: int | None = None) -> int:
    """``step`` if given, else the training step saved in the checkpoint's ``vid2vid-checkpoint.json``."""
    if step is not None:
        return int(step)
    try:
        return int(read_manifest(checkpoint_dir)["state"]["step"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir}: no {CHECKPOINT_MANIFEST} to read the training step from; "
                                f"pass step=N") from None


def resolve_target(checkpoint_dir: str | Path, cfg, run_id: str | None = None,
                   tracking_uri: str | None = None) -> RunTarget:
    """The training run of a checkpoint at ``<run_dir>/ray/<run_name>/<checkpoint>``.

    Run id: ``run_id`` > ``<run_name>/mlflow_run_id.txt``. Tracking URI: ``tracking_uri`` > the run's
    ``train.tracking_uri`` > ``MLFLOW_TRACKING_URI`` > the trainer's default SQLite file in run_dir.
    """
    ckpt = storage.normalize(checkpoint_dir)  # a folder or a URI (s3://...)
    run_folder = storage.parent(ckpt)
    ray_dir = storage.parent(run_folder)
    run_dir = storage.parent(ray_dir) if storage.name(ray_dir) == "ray" else storage.normalize(cfg.train.run_dir)
    if run_id is None:
        run_id = read_run_id(run_folder)
    uri = resolve_tracking_uri(tracking_uri or cfg.train.tracking_uri, run_dir)
    return RunTarget(run_id, uri, storage.local_dir(run_dir))  # statistics cache and journal: local files


# ------------------------------------------------------------------------------------------------
# Which nets run


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def _weights_sha(path: Path) -> str:
    """sha256 of a weights file, hashed once per (path, size, mtime): the evaluator beside training
    would otherwise re-read 200 MB of ResNeXt for every checkpoint."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def select_nets(eval_cfg: EvalConfig, input_sizes: dict[str, int] | None = None
                ) -> tuple[dict[str, NetSpec], dict[str, str]]:
    """(nets that will run, metric -> reason for each metric that will not)."""
    sizes = {**SIZES, **(input_sizes or {})}
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"input_sizes: unknown nets {unknown}; valid: {sorted(SIZES)}")
    if sizes != SIZES and not eval_cfg.allow_random_weights:
        raise ValueError(f"input_sizes {input_sizes} differ from the protocol {SIZES}: a test-only switch, "
                         f"allowed only with eval.allow_random_weights=true")
    nets, skipped = {}, {}
    for net, key in NETS.items():
        path = getattr(eval_cfg, key)
        columns = feature_columns(net, SIZES[net])
        if path is None or not Path(path).is_file():
            msg = missing_weights_message(net) + ("" if path is None else f" No file at {path}.")
            log.warning(msg)
            skipped.update({METRICS[c]: msg for c in columns})
            continue
        random = is_random_weights_file(path)
        if random and not eval_cfg.allow_random_weights:
            raise ValueError(f"{path}: random test weights (marker {Path(path).name}.random-weights beside it); "
                             f"metrics from them are not FID. Supply the real {SPECS[net].public_file}, or set "
                             f"eval.allow_random_weights=true in a test")
        nets[net] = NetSpec(str(path), _weights_sha(Path(path)), random, int(sizes[net]))
        if "i3d_logits" not in feature_columns(net, sizes[net]) and net == "i3d":
            skipped[METRICS["i3d_logits"]] = (f"FVD needs I3D inputs of at least {FVD_MIN_SIZE}px (the public "
                                              f"logits window); this evaluation uses {sizes[net]}px")
    return nets, skipped


# ------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class _Totals:
    stats: dict[tuple[str, str], StreamingStats] = field(default_factory=dict)
    warp_fake: float = 0.0
    warp_real: float = 0.0
    warp_mass: float = 0.0
    real_clips: int = 0

    def add(self, batch: dict[str, np.ndarray], nets: dict[str, NetSpec]) -> None:
        kinds = np.asarray(batch["kind"]).astype(str)
        mass = np.asarray(batch["warp_mass"], np.float64)
        self.warp_fake += float((np.asarray(batch["warp_fake"]) * mass).sum())
        self.warp_real += float((np.asarray(batch["warp_real"]) * mass).sum())
        self.warp_mass += float(mass.sum())
        if nets:
            self.real_clips += int((kinds == "real").sum())
        for net, spec in nets.items():
            valid = np.asarray(batch[f"{net}_valid"], bool)
            for column in feature_columns(net, spec.size):
                for kind in ("real", "fake"):
                    rows = valid & (kinds == kind)
                    if rows.any():
                        self.stats.setdefault((column, kind), StreamingStats()).update(batch[column][rows])


def _resources(pools: int, actors: int | None, cpus_per_actor: float | None) -> tuple[int, float, float]:
    """(actors per pool, CPUs per actor, GPUs per actor) for ``pools`` pools running at once.

    With G >= pools GPUs: G // pools actors per pool, one GPU each. With fewer GPUs (one GPU, three
    pools) the actors share them (1/3 GPU each): one whole GPU per actor would leave two pools
    waiting for ever. CPU-only: one actor per pool, sharing the cluster's CPUs when there are fewer
    than the pools (2 CPUs, 3 pools: 2/3 CPU each), for the same reason.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    if actors is None:
        actors = max(1, int(gpus) // pools)
    gpu_each = min(1.0, gpus / (pools * actors)) if gpus > 0 else 0.0
    cpu_each = cpus_per_actor if cpus_per_actor is not None else min(1.0, cpus / (pools * actors))
    return actors, cpu_each, gpu_each


def _run_pipeline(checkpoint_dir: Path, plan: ClipPlan, nets: dict[str, NetSpec], need_real: dict[str, bool],
                  batch_size: int, actors: int | None, cpus_per_actor: float | None) -> _Totals:
    import ray.data

    n_actors, cpus, gpus = _resources(1 + len(nets), actors, cpus_per_actor)
    pool = {"compute": ray.data.ActorPoolStrategy(size=n_actors), "num_cpus": cpus, "num_gpus": gpus,
            "batch_size": batch_size, "batch_format": "numpy"}
    items = [{"index": i, "segment": encode_segment(s)} for i, s in enumerate(plan.segments)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(GenerateClips, fn_constructor_kwargs={
        "checkpoint_dir": str(checkpoint_dir), "emit_real": any(need_real.values()), "emit_frames": bool(nets)},
        **pool)
    for i, (net, spec) in enumerate(nets.items()):
        ds = ds.map_batches(ExtractFeatures, fn_constructor_kwargs={
            "net": net, "weights_path": spec.path, "size": spec.size, "skip_real": not need_real[net],
            "drop_frames": i == len(nets) - 1, "expect_random": spec.random}, **pool)
    totals = _Totals()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        totals.add(batch, nets)
    return totals


# ------------------------------------------------------------------------------------------------
# The service


def _dataset_id(shards: Path) -> str:
    """Name of the shards folder plus a digest of its manifest: re-prepared data gets new statistics."""
    digest = hashlib.sha256(storage.read_bytes(storage.join(shards, SHARDS_MANIFEST))).hexdigest()[:12]
    return f"{storage.name(storage.normalize(shards))}-{digest}"


def _cache_keys(shards: Path, manifest: dict, plan: ClipPlan, nets: dict[str, NetSpec]) -> dict[tuple[str, str], str]:
    """(net, feature column) -> real-statistics cache key. The clip selection is part of the split
    field and the net's input size part of the resolution field: either changes the real features."""
    resolution = "x".join(str(v) for v in manifest["resolution"])
    selection = f"{plan.split}-{len(plan.segments)}clips-{plan.frames}f"
    return {(net, c): stats_cache_key(_dataset_id(shards), selection, f"{resolution}-in{spec.size}", c, spec.sha256)
            for net, spec in nets.items() for c in feature_columns(net, spec.size)}


def _tags(plan: ClipPlan, step: int, skipped: dict[str, str], random: list[str]) -> dict[str, str]:
    tags = {"eval/split": plan.split, "eval/clips": f"{len(plan.segments)} x {plan.frames} frames",
            "eval/last_step": str(step), "eval/protocol": PROTOCOL,
            **{f"eval/skipped/{m.split('/')[-1]}": why for m, why in skipped.items()}}
    if random:
        tags["eval/random_weights"] = (f"{', '.join(random)}: random TEST weights; the random_weights/* metrics "
                                       f"are not FID and not comparable to any published number")
    return tags


def evaluate_checkpoint(checkpoint_dir: str | Path, shards: str | Path, eval_cfg: EvalConfig | None = None, *,
                        step: int | None = None, run_id: str | None = None, tracking_uri: str | None = None,
                        run_dir: str | Path | None = None, log_to_mlflow: bool = True,
                        input_sizes: dict[str, int] | None = None, actors: int | None = None,
                        cpus_per_actor: float | None = None) -> EvalResult:
    """Evaluate one checkpoint and log the metrics to its training run at its training step.

    ``eval_cfg`` defaults to the checkpoint's own ``eval`` section. ``input_sizes`` (test only, e.g.
    ``{"resnext101": 64}``) shrinks a net's input below the protocol (see ``extract.py``).
    ``actors`` is the actor count of each pool and ``cpus_per_actor`` what each actor reserves
    (defaults: :func:`_resources`; the generator and each net are a pool, all running at once).
    """
    t0 = time.perf_counter()
    checkpoint_dir, shards = storage.normalize(checkpoint_dir), storage.normalize(shards)  # folders or URIs
    cfg = load_config(checkpoint_dir)
    ev = eval_cfg or cfg.eval
    step = checkpoint_step(checkpoint_dir, step)
    target = resolve_target(checkpoint_dir, cfg, run_id, tracking_uri)
    if run_dir is not None:
        target = RunTarget(target.run_id, target.tracking_uri, Path(run_dir))
    manifest = load_manifest(shards)
    check_model_fits(cfg.model, manifest, shards, advice="evaluate on shards prepared like the checkpoint's "
                                                          "training data")
    nets, skipped = select_nets(ev, input_sizes)
    plan = plan_clips(shards, ev.num_clips, ev.clip_len)
    log.info("evaluating %s (step %d): %d clips of %d frames from the %r split%s", checkpoint_dir, step,
             len(plan.segments), plan.frames, plan.split, "" if plan.split == "val" else " (no val split)")

    cache_dir = Path(ev.stats_cache_dir) if ev.stats_cache_dir else target.run_dir / "eval_stats"
    keys = _cache_keys(shards, manifest, plan, nets)
    need_real = {net: any(not (cache_dir / f"{k}.npz").is_file() for (n, _), k in keys.items() if n == net)
                 for net in nets}
    if nets and len(plan.segments) < 2:
        skipped.update({METRICS[c]: f"needs >= 2 clips for a covariance, the {plan.split} split gives "
                                    f"{len(plan.segments)}" for (_, c) in keys})
        nets, keys, need_real = {}, {}, {}
    timings = {"setup": time.perf_counter() - t0}
    totals = _run_pipeline(checkpoint_dir, plan, nets, need_real, ev.batch_size, actors, cpus_per_actor)
    timings["pipeline"] = time.perf_counter() - t0 - sum(timings.values())

    metrics: dict[str, float] = {}
    for (net, column), key in keys.items():
        real = load_or_compute_real_stats(cache_dir, key, lambda c=column: totals.stats[(c, "real")].finalize())
        fake = totals.stats[(column, "fake")].finalize()
        metrics[metric_name(METRICS[column], nets[net].random)] = frechet_distance(real, fake)
    if totals.warp_mass > 0:
        metrics["eval/warping_error"] = totals.warp_fake / totals.warp_mass
        metrics["eval/warping_error_real"] = totals.warp_real / totals.warp_mass
    else:
        skipped["eval/warping_error"] = "the ground-truth flow confidence is zero on every evaluated frame"

    timings["frechet"] = time.perf_counter() - t0 - sum(timings.values())
    random = sorted(n for n, s in nets.items() if s.random)
    result = EvalResult(step, plan.split, len(plan.segments), plan.frames, metrics, skipped, random,
                        target.run_id, target.tracking_uri, totals.real_clips, 0.0,
                        _tags(plan, step, skipped, random), timings)
    if log_to_mlflow:
        result.run_id = log_to_run(result, target, cfg, checkpoint_dir)
    timings["mlflow"] = time.perf_counter() - t0 - sum(timings.values())
    result.seconds = time.perf_counter() - t0
    log.info("evaluation of step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())))
    return result


def log_to_run(result: EvalResult, target: RunTarget, cfg, checkpoint_dir: Path) -> str | None:
    """Tags, and metrics at ``result.step``, into the training run (a new run when there is none)."""
    tags = dict(result.tags)
    if target.run_id is None:
        log.warning("%s: no training run found (no %s beside it and no run_id given); logging to a new run",
                    checkpoint_dir, RUN_ID_FILE)
        tags["eval/checkpoint"] = str(checkpoint_dir)
    tracker = RunTracker(target.tracking_uri, cfg.train.experiment, run_id=target.run_id,
                         run_name=None if target.run_id else f"eval-{storage.name(checkpoint_dir)}",
                         run_dir=target.run_dir / "eval")
    tracker.set_tags(tags)
    tracker.log_metrics(result.metrics, step=result.step)
    if target.run_id is None:
        tracker.end()
    return tracker.run_id


class RunTracker(Tracker):
    """A Tracker that adds to an existing run without touching its status.

    ``Tracker`` marks a resumed run RUNNING (right for a resumed training job). The evaluator logs into
    a run that is either still training (the trainer will end it) or finished; a status change from
    here would race with the trainer's own ``end`` and could leave a finished run RUNNING for ever.
    So only the run's existence is checked.
    """

    resume_status = None  # also when its start is replayed from the offline journal (vid2vid sync-tracking)

    def _start_run(self, tags):
        if self.run_id is None:
            return super()._start_run(tags)
        self.client.get_run(self.run_id)
        if tags:
            self._push({"kind": "tags", "values": tags})
