"""The evaluation service: checkpoint -> validation clips -> features -> metrics -> the training run.

:func:`evaluate_checkpoint` runs one Ray Data pipeline, streaming, memory-bounded:

    segments (metadata) -> EvaluateClips actors (load the checkpoint and every feature net once;
                           generate, features, warping error, tOF; only numbers leave) -> driver

The actors are data parallel (``worker.py``): one per GPU, or one per CPU on a CPU box. The driver
keeps the generated clips' features (a few MB) and folds the real ones into streaming statistics.
Metrics (protocols in ``preprocess.py`` and ``extract.py``, and the README's metric table):

- ``eval/fid_i3d``, ``eval/fvd``, ``eval/fvd_styleganv``, ``eval/fid_resnext``: Fréchet distances to
  real-clip statistics cached per (dataset, split + clip selection, resolution + input, metric,
  weights sha256) under ``eval.stats_cache_dir`` (default ``<run_dir>/eval_stats``): the real clips
  pass through the nets on the first evaluation only. Each is logged with ``<name>/clips`` (the
  generated clips behind it) and ``<name>/ci95_low`` / ``<name>/ci95_high``, a basic-bootstrap 95%
  interval over those clips (``frechet.py``; ``eval.bootstrap`` resamples, features computed once).
  Fewer clips than feature dimensions logs a warning and the tag ``eval/small_n/<name>``.
- ``eval/warping_error`` (generated frames under the ground-truth flow) beside
  ``eval/warping_error_real`` (the same on the real frames: the floor occlusions and flow errors
  leave), and ``eval/tof`` (TecoGAN's tOF: the generated motion against the real one, ``temporal.py``).
- Multimodal models: the above with per-object styles sampled from the checkpoint's ``styles.npz``
  (fitted on ``eval.style_fit_clips`` training clips when missing); with ``eval.styles=real|both``
  also (or only) the reconstruction from E's features of the real frames, as ``<name>_recon``.

Split: ``val`` (``eval.split``); training clips only with ``eval.split=train``, tagged
``eval/on_training_clips``. Weights: each net's setting is a path, ``auto`` (downloaded once and
checked, ``vid2vid/weights.py``) or ``URL#sha256=``; a net without weights (or whose download failed)
is skipped and the log and a run tag say why. Random test weights need
``eval.allow_random_weights=true``; their metrics are logged as ``random_weights/eval/...`` and the
run is tagged ``eval/random_weights``.

Metrics land in THE TRAINING RUN, at the checkpoint's training step: the run id comes from the
argument, else from ``mlflow_run_id.txt`` that the trainer writes beside the checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vid2vid import storage
from vid2vid.checkpoints import RUN_ID_FILE, checkpoint_step, load_config, read_run_id
from vid2vid.config import EvalConfig
from vid2vid.datasets.shards import MANIFEST as SHARDS_MANIFEST
from vid2vid.datasets.shards import check_model_fits, load_manifest
from vid2vid.eval.clips import ClipPlan, encode_segment, plan_clips
from vid2vid.eval.extract import FVD_MIN_SIZE, METRICS, NET_SETTINGS, FeatureMetric, metrics_for
from vid2vid.eval.feature_nets import SPECS, is_random_weights_file, metric_name, missing_weights_message
from vid2vid.eval.frechet import (
    FrechetEstimate,
    StreamingStats,
    frechet_with_interval,
    load_or_compute_real_stats,
    stats_cache_key,
)
from vid2vid.eval.preprocess import SIZES, protocol
from vid2vid.eval.worker import FAKE, REAL, RECON, EvaluateClips, TofFlow, WeightsRef, WorkerSpec
from vid2vid.platform.tracking import Tracker, resolve_tracking_uri
from vid2vid.weights import parse_source, resolve, sha256_file

log = logging.getLogger("vid2vid.eval")

SUFFIX = {FAKE: "", RECON: "_recon"}  # metric-name suffix of each generated kind


@dataclass
class EvalResult:
    step: int
    split: str  # "val", or "train" when eval.split=train asked for training clips
    num_clips: int
    clip_frames: int
    metrics: dict[str, float]  # MLflow names, e.g. "eval/fid_i3d", "eval/fid_i3d/ci95_low", "random_weights/..."
    skipped: dict[str, str]  # metric -> why it was not computed (e.g. which weights file to supply)
    random_weights: list[str]  # nets that ran on random test weights
    run_id: str | None
    tracking_uri: str | None
    real_clips_extracted: int  # real clips that went through the nets (0: all statistics cached)
    seconds: float
    tags: dict[str, str] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)  # s: setup, pipeline (incl. actor_startup), frechet, mlflow
    estimates: dict[str, FrechetEstimate] = field(default_factory=dict)  # metric name -> value, clips, interval


@dataclass(frozen=True)
class RunTarget:
    run_id: str | None
    tracking_uri: str
    run_dir: Path  # the training run_dir: default tracking store and statistics cache live there


@dataclass(frozen=True)
class NetSpec:
    ref: WeightsRef
    random: bool

    @property
    def sha256(self) -> str:
        return self.ref.sha256


# ------------------------------------------------------------------------------------------------
# Where the results go


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
    """(nets that will run, metric -> reason for each metric that will not). ``auto`` and URL
    settings are downloaded here, on the driver, once (the actors then find the file)."""
    sizes = {**SIZES, **(input_sizes or {})}
    unknown = sorted(set(sizes) - set(SIZES))
    if unknown:
        raise ValueError(f"input_sizes: unknown inputs {unknown}; valid: {sorted(SIZES)}")
    if sizes != SIZES and not eval_cfg.allow_random_weights:
        raise ValueError(f"input_sizes {input_sizes} differ from the protocol {SIZES}: a test-only switch, "
                         f"allowed only with eval.allow_random_weights=true")
    nets, skipped = {}, {}
    for net, key in NET_SETTINGS.items():
        value = getattr(eval_cfg, key)
        names = [m.name for m in METRICS.values() if m.net == net]
        try:  # a refused checksum (ValueError) stops the evaluation: the bytes are not the published ones
            path = resolve(value, net, f"eval.{key}")
        except OSError as err:  # no network, a dead mirror: the metric is skipped, and the log and a tag say why
            path, why = None, str(err)
        else:
            why = None if path is not None and path.is_file() else (
                missing_weights_message(net) + ("" if value is None else f" No file at {path}."))
        if why:
            log.warning(why)
            skipped.update({f"eval/{n}": why for n in names})
            continue
        random = is_random_weights_file(path)
        if random and not eval_cfg.allow_random_weights:
            raise ValueError(f"{path}: random test weights (marker {path.name}.random-weights beside it); "
                             f"metrics from them are not FID. Supply the real {SPECS[net].public_file}, or set "
                             f"eval.allow_random_weights=true in a test")
        source = parse_source(str(value), net, f"eval.{key}")
        nets[net] = NetSpec(WeightsRef(str(path.resolve()), _weights_sha(path), source), random)
    if "i3d" in nets and sizes["fvd"] < FVD_MIN_SIZE:
        skipped["eval/fvd"] = (f"FVD needs I3D inputs of at least {FVD_MIN_SIZE}px (the public logits window); "
                               f"this evaluation uses {sizes['fvd']}px")
    return nets, skipped


# ------------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class _Totals:
    """What the driver folds from the actors' rows."""

    real: dict[str, StreamingStats] = field(default_factory=dict)
    fake: dict[tuple[str, str], dict[int, np.ndarray]] = field(default_factory=lambda: defaultdict(dict))
    sums: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))
    real_clips: int = 0
    actor_startup: float = 0.0  # the slowest actor's loading time (they start side by side)

    def add(self, batch: dict[str, np.ndarray], metrics: list[str]) -> None:
        kinds = np.asarray(batch["kind"]).astype(str)
        index = np.asarray(batch["index"]).astype(int)
        self.real_clips += int((kinds == REAL).sum())
        self.actor_startup = max(self.actor_startup, float(np.max(batch["startup_s"], initial=0.0)))
        for m in metrics:
            valid = np.asarray(batch[f"{m}_valid"], bool)
            rows = valid & (kinds == REAL)
            if rows.any():
                self.real.setdefault(m, StreamingStats()).update(batch[m][rows])
            for row in np.flatnonzero(valid & (kinds != REAL)):
                self.fake[(m, kinds[row])][int(index[row])] = np.asarray(batch[m][row], np.float64)
        for kind in set(kinds) - {REAL}:
            rows = kinds == kind
            mass = np.asarray(batch["warp_mass"], np.float64)[rows]
            for key in ("warp", "warp_real"):
                self.sums[(key, kind)] += float((np.asarray(batch[key])[rows] * mass).sum())
            self.sums[("warp_mass", kind)] += float(mass.sum())
            for key in ("tof", "tof_pairs"):
                self.sums[(key, kind)] += float(np.asarray(batch[key], np.float64)[rows].sum())

    def features(self, metric: str, kind: str) -> np.ndarray:
        """(N, D) generated features in clip order (the bootstrap's seed then means the same resamples)."""
        by_index = self.fake[(metric, kind)]
        return np.stack([by_index[i] for i in sorted(by_index)])


def _pool(actors: int | None, cpus_per_actor: float | None) -> tuple[int, int, float, float]:
    """(min actors, max actors, CPUs per actor, GPUs per actor) of the evaluation pool.

    GPUs: one actor per GPU (max). CPU-only: one actor per ``cpus_per_actor`` (default 1) of the
    cluster's CPUs, each running torch with that many threads. The pool starts with what is free
    (``min`` 1 unless ``actors`` fixes the size): beside training some CPUs or GPUs stay taken.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"))
    total = ray.cluster_resources()
    gpus, cpus = float(total.get("GPU", 0)), float(total.get("CPU", 1))
    cpu_each = cpus_per_actor if cpus_per_actor is not None else 1.0
    if gpus >= 1:
        most = actors or int(gpus)
        return (most if actors else 1), most, cpu_each, min(1.0, gpus / most)
    most = actors or max(1, int(cpus // max(cpu_each, 1e-9)))
    return (most if actors else 1), most, cpu_each, 0.0


def _run_pipeline(plan: ClipPlan, spec: WorkerSpec, batch_size: int, actors: int | None,
                  cpus_per_actor: float | None) -> _Totals:
    import ray.data

    low, high, cpus, gpus = _pool(actors, cpus_per_actor)
    spec.threads = max(1, int(cpus))
    items = [{"index": i, "segment": encode_segment(s)} for i, s in enumerate(plan.segments)]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    with warnings.catch_warnings():
        # max_restarts=0 as in datasets/prepare.py: a crashed actor fails the evaluation (logged; the
        # next checkpoint is still evaluated) instead of Ray's error-level notice about restartable
        # actors whose constructor arguments live in the object store.
        warnings.simplefilter("ignore", DeprecationWarning)
        ds = ds.map_batches(EvaluateClips, fn_constructor_kwargs={"spec": spec},
                            compute=ray.data.ActorPoolStrategy(min_size=low, max_size=high), num_cpus=cpus,
                            num_gpus=gpus, batch_size=batch_size, batch_format="numpy", max_restarts=0)
    totals = _Totals()
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        totals.add(batch, spec.metrics)
    return totals


# ------------------------------------------------------------------------------------------------
# The service


def _dataset_id(shards: Path) -> str:
    """Name of the shards folder plus a digest of its manifest: re-prepared data gets new statistics."""
    digest = hashlib.sha256(storage.read_bytes(storage.join(shards, SHARDS_MANIFEST))).hexdigest()[:12]
    return f"{storage.name(storage.normalize(shards))}-{digest}"


def _cache_keys(shards: Path, manifest: dict, plan: ClipPlan, metrics: list[FeatureMetric], nets: dict[str, NetSpec],
                sizes: dict[str, int], fid_frame: str) -> dict[str, str]:
    """metric -> real-statistics cache key. The clip selection is part of the split field, the input
    (protocol, size, crop) part of the resolution field: each changes the real features."""
    resolution = "x".join(str(v) for v in manifest["resolution"])
    selection = f"{plan.split}-{len(plan.segments)}clips-{plan.frames}f"
    keys = {}
    for m in metrics:
        p = protocol(m.view, fid_frame)
        field_ = f"{resolution}-{m.view}{sizes[m.view]}-{p.frame}"
        keys[m.name] = stats_cache_key(_dataset_id(shards), selection, field_, m.name, nets[m.net].sha256)
    return keys


def _kinds(model_cfg, ev: EvalConfig) -> list[str]:
    if not model_cfg.use_features:
        return [FAKE]
    return {"sampled": [FAKE], "real": [RECON], "both": [FAKE, RECON]}[ev.styles]


def _styles(checkpoint_dir: str | Path, shards: str | Path, ev: EvalConfig, kinds: list[str],
            model_cfg) -> str | None:
    """The per-class mixtures a multimodal model is evaluated with: the checkpoint's ``styles.npz``,
    fitted on the training split (``eval.style_fit_clips`` clips) when it is not there yet. The styles
    file is read and written locally (generate/styles.py): a URI checkpoint is refused with a clear error."""
    if FAKE not in kinds or not model_cfg.use_features:
        return None
    from vid2vid.generate.styles import STYLES_FILE, fit_styles

    checkpoint_dir = storage.local_path(checkpoint_dir, "the checkpoint of a multimodal model (its styles.npz)")
    path = checkpoint_dir / STYLES_FILE
    if not path.is_file():
        log.info("%s: no %s; fitting per-class style mixtures on %d training clips (vid2vid fit-styles)",
                 checkpoint_dir, STYLES_FILE, ev.style_fit_clips)
        fit_styles(checkpoint_dir, shards, split="train", max_clips=ev.style_fit_clips, out=path)
    return str(path)


def _tof_flow(manifest: dict) -> TofFlow:
    """tOF with the estimator the shards' flows came from (their flows reused for the real clips); for
    synthetic shards (exact flow) or RAFT without its weights here: DIS on both real and generated."""
    flow = manifest.get("flow", {})
    method, weights = flow.get("estimator"), flow.get("weights")
    if method == "raft" and weights and Path(weights).is_file():
        return TofFlow("raft", weights, True)
    return TofFlow("dis", None, method == "dis")


def _tags(plan: ClipPlan, manifest: dict, step: int, skipped: dict[str, str], random: list[str],
          small: dict[str, str], multimodal: bool, tof: TofFlow, ev: EvalConfig) -> dict[str, str]:
    origin = manifest["splits"].get(plan.split, {}).get("origin", "")
    tags = {"eval/split": plan.split, "eval/clips": f"{len(plan.segments)} x {plan.frames} frames",
            "eval/last_step": str(step), "eval/protocol": protocol_tag(ev.fid_frame),
            "eval/tof_flow": f"{tof.method}" + (" (real flows from the shards)" if tof.real_from_shards else ""),
            **{f"eval/skipped/{m.split('/')[-1]}": why for m, why in skipped.items()},
            **{f"eval/small_n/{m}": why for m, why in small.items()}}
    if origin:
        tags["eval/split_origin"] = origin
    if plan.split == "train":
        tags["eval/on_training_clips"] = ("eval.split=train: generated from TRAINING clips, which the model has "
                                          "seen; not a validation number")
    if multimodal:
        tags["eval/styles"] = {"sampled": "styles sampled from the per-class mixtures (styles.npz)",
                               "real": "E's features of the real frames (reconstruction, *_recon)",
                               "both": "sampled styles, and E's features of the real frames as *_recon"}[ev.styles]
    if random:
        tags["eval/random_weights"] = (f"{', '.join(random)}: random TEST weights; the random_weights/* metrics "
                                       f"are not FID and not comparable to any published number")
    return tags


def protocol_tag(fid_frame: str = "crop") -> str:
    fid = "centre crop" if fid_frame == "crop" else "whole frame"
    return (f"16-frame clips. FID-I3D: I3D Mixed_5c pooled 1024-d, 224^2 {fid}; FVD and FVD-StyleGAN-V: "
            f"I3D logits 400-d, whole frame 224^2 TF bilinear, [-1,1]; FID-ResNeXt: layer4 pooled 2048-d, "
            f"112^2 {fid}. 95% basic-bootstrap intervals over the generated clips.")


def _frechet(totals: _Totals, metrics: list[FeatureMetric], kinds: list[str], keys: dict[str, str], cache_dir: Path,
             nets: dict[str, NetSpec], ev: EvalConfig) -> tuple[dict[str, float], dict[str, FrechetEstimate],
                                                               dict[str, str]]:
    """Every Fréchet metric with its clip count and interval, plus the small-N warnings."""
    values, estimates, small = {}, {}, {}
    for m in metrics:
        real = load_or_compute_real_stats(cache_dir, keys[m.name], lambda m=m: totals.real[m.name].finalize())
        for kind in kinds:
            est = frechet_with_interval(real, totals.features(m.name, kind), ev.bootstrap, seed=0, ddof=m.ddof)
            name = metric_name(f"eval/{m.name}{SUFFIX[kind]}", nets[m.net].random)
            estimates[name] = est
            values.update({name: est.value, f"{name}/clips": float(est.clips)})
            if est.low is not None:
                values.update({f"{name}/ci95_low": est.low, f"{name}/ci95_high": est.high})
            if est.fewer_clips_than_dims:
                why = (f"{est.clips} clips < {est.dim} feature dimensions: the estimate is biased far upwards and "
                       f"its bootstrap interval does not cover the true distance reliably (it does from N >= D "
                       f"on, see the README); compare runs only at equal clip counts")
                small[f"{m.name}{SUFFIX[kind]}"] = why
                log.warning("%s: %s", name, why)
    return values, estimates, small


def _temporal(totals: _Totals, kinds: list[str], skipped: dict[str, str]) -> dict[str, float]:
    out = {}
    for kind in kinds:
        suffix = SUFFIX[kind]
        mass = totals.sums[("warp_mass", kind)]
        if mass > 0:
            out[f"eval/warping_error{suffix}"] = totals.sums[("warp", kind)] / mass
            out["eval/warping_error_real"] = totals.sums[("warp_real", kind)] / mass
        else:
            skipped[f"eval/warping_error{suffix}"] = "the ground-truth flow confidence is zero on every evaluated frame"
        pairs = totals.sums[("tof_pairs", kind)]
        if pairs > 0:
            out[f"eval/tof{suffix}"] = totals.sums[("tof", kind)] / pairs
        else:
            skipped[f"eval/tof{suffix}"] = "no frame pair with a real flow to compare with"
    return out


def evaluate_checkpoint(checkpoint_dir: str | Path, shards: str | Path, eval_cfg: EvalConfig | None = None, *,
                        step: int | None = None, run_id: str | None = None, tracking_uri: str | None = None,
                        run_dir: str | Path | None = None, log_to_mlflow: bool = True,
                        input_sizes: dict[str, int] | None = None, actors: int | None = None,
                        cpus_per_actor: float | None = None) -> EvalResult:
    """Evaluate one checkpoint and log the metrics to its training run at its training step.

    ``eval_cfg`` defaults to the checkpoint's own ``eval`` section. ``input_sizes`` (test only, e.g.
    ``{"resnext101": 64}``) shrinks an input below the protocol (see ``extract.py``). ``actors`` fixes
    the pool size and ``cpus_per_actor`` what each actor reserves (defaults: :func:`_pool`).
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
    plan = plan_clips(shards, ev.num_clips, ev.clip_len, ev.split)
    nets, skipped = select_nets(ev, input_sizes)
    sizes = {**SIZES, **(input_sizes or {})}
    metrics = metrics_for(set(nets), sizes)
    kinds = _kinds(cfg.model, ev)
    log.info("evaluating %s (step %d): %d clips of %d frames from the %r split", checkpoint_dir, step,
             len(plan.segments), plan.frames, plan.split)
    if plan.split == "train":
        log.warning("eval.split=train: evaluating on TRAINING clips (tagged eval/on_training_clips)")

    cache_dir = Path(ev.stats_cache_dir) if ev.stats_cache_dir else target.run_dir / "eval_stats"
    if metrics and len(plan.segments) < 2:
        skipped.update({f"eval/{m.name}": f"needs >= 2 clips for a covariance, the {plan.split} split gives "
                                          f"{len(plan.segments)}" for m in metrics})
        metrics = []
    keys = _cache_keys(shards, manifest, plan, metrics, nets, sizes, ev.fid_frame)
    real_needed = [m for m, k in keys.items() if not (cache_dir / f"{k}.npz").is_file()]
    tof = _tof_flow(manifest)
    spec = WorkerSpec(str(checkpoint_dir), {n: s.ref for n, s in nets.items() if any(m.net == n for m in metrics)},
                      [m.name for m in metrics], real_needed, sizes, ev.fid_frame, kinds,
                      _styles(checkpoint_dir, shards, ev, kinds, cfg.model), ev.style_seed, tof,
                      expect_random={n: s.random for n, s in nets.items()})
    timings = {"setup": time.perf_counter() - t0}
    totals = _run_pipeline(plan, spec, ev.batch_size, actors, cpus_per_actor)
    timings["pipeline"] = time.perf_counter() - t0 - sum(timings.values())
    timings["actor_startup"] = totals.actor_startup  # part of "pipeline": loading the models in the actors

    t_frechet = time.perf_counter()
    values, estimates, small = _frechet(totals, metrics, kinds, keys, cache_dir, nets, ev)
    values.update(_temporal(totals, kinds, skipped))
    timings["frechet"] = time.perf_counter() - t_frechet
    random = sorted(n for n, s in nets.items() if s.random)
    tags = _tags(plan, manifest, step, skipped, random, small, cfg.model.use_features, tof, ev)
    result = EvalResult(step, plan.split, len(plan.segments), plan.frames, values, skipped, random,
                        target.run_id, target.tracking_uri, totals.real_clips, 0.0, tags, timings, estimates)
    t_mlflow = time.perf_counter()
    if log_to_mlflow:
        result.run_id = log_to_run(result, target, cfg, checkpoint_dir)
    timings["mlflow"] = time.perf_counter() - t_mlflow
    result.seconds = time.perf_counter() - t0
    log.info("evaluation of step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())
                                                          if "/ci95" not in k and not k.endswith("/clips")))
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
    tracker.clear_stale_tags(tags)
    tracker.set_tags(tags)
    tracker.log_metrics(tracker.not_yet_logged(result.metrics, result.step), step=result.step)
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

    # Re-evaluating a checkpoint: its step keeps one point per metric and no outdated tag.
    STALE_TAGS = ("eval/skipped/", "eval/random_weights")

    def clear_stale_tags(self, tags: dict[str, str]) -> None:
        """Delete ``eval/skipped/*`` (and ``eval/random_weights``) tags of an earlier evaluation that this
        one does not set again (e.g. an FID computed now that its weights are given)."""
        if self.run_id is None or self.offline:
            return

        def clear():
            for key in self.client.get_run(self.run_id).data.tags:
                if key.startswith(self.STALE_TAGS) and key not in tags:
                    self.client.delete_tag(self.run_id, key)
        self._call("clear stale tags", clear)

    def not_yet_logged(self, metrics: dict[str, float], step: int) -> dict[str, float]:
        """``metrics`` without those the run already holds at ``step`` with the same value, so evaluating a
        checkpoint again adds no second point. (MLflow cannot delete a point: a value that changed is
        added, and it is the one MLflow then shows as the run's.)"""
        if self.run_id is None or self.offline:
            return metrics
        out = dict(metrics)

        def drop_logged():
            for key, value in metrics.items():
                if any(m.step == step and math.isclose(m.value, value, rel_tol=1e-9, abs_tol=1e-12)
                       for m in self.client.get_metric_history(self.run_id, key)):
                    out.pop(key)
        self._call("read metric history", drop_logged)
        return out
