"""The evaluation service: checkpoint -> validation clips -> features -> metrics, as an :class:`EvalResult`.

:func:`evaluate_checkpoint` runs one Ray Data pipeline, streaming, memory-bounded:

    segments (metadata) -> EvaluateClips actors (load the checkpoint and every feature net once;
                           generate, features, warping error, tOF; only numbers leave) -> driver

The actors are data parallel (``worker.py``): one per GPU, or one per CPU on a CPU box. The driver
keeps the generated clips' features (a few MB) and folds the real ones into streaming statistics
(``metric_utils.py``). The metrics are the registry's (``metrics/``, and the README's metric table):

- ``eval/fid_i3d``, ``eval/fvd``, ``eval/fvd_styleganv``, ``eval/fid_resnext``: Fréchet distances to
  real-clip statistics cached per (dataset, split + clip selection, resolution + input, metric,
  weights sha256) under ``eval.stats_cache_dir`` (default ``<run_dir>/eval_stats``): the real clips
  pass through the nets on the first evaluation only. Each comes with ``<name>/clips`` (the
  generated clips behind it) and ``<name>/ci95_low`` / ``<name>/ci95_high``, a basic-bootstrap 95%
  interval over those clips (``frechet.py``; ``eval.bootstrap`` resamples, features computed once).
  Fewer clips than feature dimensions logs a warning and lands in ``EvalResult.small_n``.
- ``eval/warping_error`` (generated frames under the ground-truth flow) beside
  ``eval/warping_error_real`` (the same on the real frames: the floor occlusions and flow errors
  leave), and ``eval/tof`` (TecoGAN's tOF: the generated motion against the real one, ``temporal.py``).
- Multimodal models: the above with per-object styles sampled from the checkpoint's ``styles.npz``
  (fitted on ``eval.style_fit_clips`` training clips when missing); with ``eval.styles=real|both``
  also (or only) the reconstruction from E's features of the real frames, as ``<name>_recon``.

Split: ``val`` (``eval.split``); training clips only with ``eval.split=train``. Weights: each net's
setting is a path, ``auto`` (downloaded once and checked, ``vid2vid/weights.py``) or ``URL#sha256=``; a
net without weights (or whose download failed) is skipped and ``EvalResult.skipped`` says why. Random
test weights need ``eval.allow_random_weights=true``; their metrics are named ``random_weights/eval/...``.

This module only computes. Recording the result in the training run (MLflow) is the platform's
(``platform/evaluation.py``), which calls this one.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

from vid2vid import storage
from vid2vid.checkpoints import checkpoint_step, load_config
from vid2vid.config import Config, EvalConfig
from vid2vid.datasets.shards import MANIFEST as SHARDS_MANIFEST
from vid2vid.datasets.shards import check_model_fits, load_manifest
from vid2vid.eval.clips import ClipPlan, encode_segment, plan_clips
from vid2vid.eval.feature_nets import SPECS, is_random_weights_file, missing_weights_message
from vid2vid.eval.frechet import FrechetEstimate, stats_cache_key
from vid2vid.eval.metric_utils import FAKE, RECON, Totals, frechet_values, temporal_values
from vid2vid.eval.metrics import FEATURE_METRICS, NET_SETTINGS, FeatureMetric, metrics_for, too_small
from vid2vid.eval.preprocess import SIZES, protocol
from vid2vid.eval.worker import EvaluateClips, TofFlow, WeightsRef, WorkerSpec
from vid2vid.weights import parse_source, resolve, sha256_file

log = logging.getLogger("vid2vid.eval")


@dataclass
class EvalResult:
    """One checkpoint's evaluation: the numbers, and what they were measured on and with."""

    step: int
    split: str  # "val", or "train" when eval.split=train asked for training clips
    num_clips: int
    clip_frames: int
    metrics: dict[str, float]  # e.g. "eval/fid_i3d", "eval/fid_i3d/ci95_low", "random_weights/..."
    skipped: dict[str, str]  # metric -> why it was not computed (e.g. which weights file to supply)
    random_weights: list[str]  # nets that ran on random test weights
    real_clips_extracted: int  # real clips that went through the nets (0: all statistics cached)
    seconds: float
    protocol: str = ""  # the metrics' input protocols in words (protocol_description)
    split_origin: str = ""  # how the shards' split was made (the manifest's "origin")
    styles: str | None = None  # eval.styles of a multimodal model (None: not multimodal)
    tof_flow: TofFlow | None = None  # the flow estimator behind tOF
    small_n: dict[str, str] = field(default_factory=dict)  # metric -> why its estimate is unreliable (N < D)
    timings: dict[str, float] = field(default_factory=dict)  # s: setup, pipeline (incl. actor_startup), frechet
    estimates: dict[str, FrechetEstimate] = field(default_factory=dict)  # metric name -> value, clips, interval


@dataclass(frozen=True)
class NetSpec:
    ref: WeightsRef
    random: bool

    @property
    def sha256(self) -> str:
        return self.ref.sha256


# ------------------------------------------------------------------------------------------------
# Where the checkpoint comes from


def training_run_dir(checkpoint_dir: str | Path, cfg) -> str:
    """The run_dir of a checkpoint at ``<run_dir>/ray/<run_name>/<checkpoint>`` (a folder or a URI),
    else the checkpoint config's ``train.run_dir``: the default statistics cache lives there."""
    ray_dir = storage.parent(storage.parent(storage.normalize(checkpoint_dir)))
    return storage.parent(ray_dir) if storage.name(ray_dir) == "ray" else storage.normalize(cfg.train.run_dir)


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
        names = [m.name for m in FEATURE_METRICS.values() if m.net == net]
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
    skipped.update(too_small(set(nets), sizes))
    return nets, skipped


# ------------------------------------------------------------------------------------------------
# The pipeline


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
                  cpus_per_actor: float | None) -> Totals:
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
    totals = Totals()
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


def protocol_description(fid_frame: str = "crop") -> str:
    fid = "centre crop" if fid_frame == "crop" else "whole frame"
    return (f"16-frame clips. FID-I3D: I3D Mixed_5c pooled 1024-d, 224^2 {fid}; FVD and FVD-StyleGAN-V: "
            f"I3D logits 400-d, whole frame 224^2 TF bilinear, [-1,1]; FID-ResNeXt: layer4 pooled 2048-d, "
            f"112^2 {fid}. 95% basic-bootstrap intervals over the generated clips.")


def evaluate_checkpoint(checkpoint_dir: str | Path, shards: str | Path, eval_cfg: EvalConfig | None = None, *,
                        step: int | None = None, run_dir: str | Path | None = None,
                        input_sizes: dict[str, int] | None = None, actors: int | None = None,
                        cpus_per_actor: float | None = None, checkpoint_cfg: Config | None = None) -> EvalResult:
    """Evaluate one checkpoint at its training step (``step`` overrides it).

    ``eval_cfg`` defaults to the checkpoint's own ``eval`` section. ``run_dir`` (default: the training
    run's, :func:`training_run_dir`) holds the default statistics cache. ``input_sizes`` (test only,
    e.g. ``{"resnext101": 64}``) shrinks an input below the protocol (see ``metrics/``). ``actors``
    fixes the pool size and ``cpus_per_actor`` what each actor reserves (defaults: :func:`_pool`).
    ``checkpoint_cfg``: the checkpoint's config when the caller has read it already.
    """
    t0 = time.perf_counter()
    checkpoint_dir, shards = storage.normalize(checkpoint_dir), storage.normalize(shards)  # folders or URIs
    cfg = checkpoint_cfg or load_config(checkpoint_dir)
    ev = eval_cfg or cfg.eval
    step = checkpoint_step(checkpoint_dir, step)
    run_dir = Path(run_dir) if run_dir is not None else storage.local_dir(training_run_dir(checkpoint_dir, cfg))
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

    cache_dir = Path(ev.stats_cache_dir) if ev.stats_cache_dir else run_dir / "eval_stats"
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
    frechet = frechet_values(totals, metrics, kinds, keys, cache_dir, {n: s.random for n, s in nets.items()},
                             ev.bootstrap)
    values = {**frechet.values, **temporal_values(totals, kinds, skipped)}
    timings["frechet"] = time.perf_counter() - t_frechet
    result = EvalResult(step, plan.split, len(plan.segments), plan.frames, values, skipped,
                        random_weights=sorted(n for n, s in nets.items() if s.random),
                        real_clips_extracted=totals.real_clips, seconds=time.perf_counter() - t0,
                        protocol=protocol_description(ev.fid_frame),
                        split_origin=manifest["splits"].get(plan.split, {}).get("origin", ""),
                        styles=ev.styles if cfg.model.use_features else None, tof_flow=tof,
                        small_n=frechet.small_n, timings=timings, estimates=frechet.estimates)
    log.info("evaluation of step %d: %s", step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(values.items())
                                                          if "/ci95" not in k and not k.endswith("/clips")))
    return result
