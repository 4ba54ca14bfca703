"""The driver side of a training run: MLflow run, Ray Train ``TorchTrainer``, placement-aware data.

``train(cfg)`` is what ``experiments/cityscapes.py`` and the Tune sweep call. A run is named
``cfg.train.run_name`` (default: ``<cfg.name>-<timestamp>``); starting a run under a name that
already exists in ``<run_dir>/ray`` resumes it from its latest checkpoint (Ray Train restores the
run's checkpoint list; the MLflow run id is kept beside it, so metrics continue in the same run).

``train.run_dir`` and the shards may be local folders or URIs (``s3://``, ``gs://``, ``file://``):
Ray Train writes checkpoints to ``<run_dir>/ray`` itself, and the run-id file, run config, sample
videos and manifest go through :mod:`vid2vid.storage`. On a cluster, either must be storage every node sees.
A resume with a changed config is refused unless ``train.allow_config_change`` (see ``resume.py``).

Before Ray Train starts, the driver says how many steps the run will take (``progress.plan_steps``);
during the run it logs one progress line per step (``progress.Progress``) when ``progress=True``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vid2vid import storage
from vid2vid.checkpoints import read_run_id, run_id_path
from vid2vid.config import Config, flatten, to_dict
from vid2vid.console import is_verbose, quiet_ray_driver, quiet_ray_worker
from vid2vid.platform.payload import WorkerPayload
from vid2vid.platform.placement import plan_placement
from vid2vid.platform.progress import Progress, StepPlan, plan_steps
from vid2vid.platform.resume import check_resume, record_config

log = logging.getLogger("vid2vid.train")
COMMIT_POLL_S = "0.25"  # how often Ray Train takes up reports and commits checkpoints: see fast_commits


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str | None
    tracking_uri: str
    checkpoint: str | None  # location of the latest checkpoint: a directory, or a URI under a URI run_dir
    metrics: dict[str, Any]
    storage: str  # <run_dir>/ray, Ray Train's storage_path
    plan: StepPlan | None = None  # the steps the driver announced


def placement_data_config(mode: str, world_size: int):
    """A Ray Train DataConfig that gives each generator rank an equal streaming shard and
    discriminator ranks ``None`` (in the split placement they receive frames from their partner).
    Ray Train V2 needs an entry for every rank, and every rank must ask for its shard (a barrier)."""
    import ray.train

    class PlacementDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            placement = plan_placement(world_size, 0, mode)
            readers = list(placement.generator_ranks)
            output: list[dict] = [dict.fromkeys(datasets) for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                ds.context.execution_options = self._resolve_execution_options(name)
                ds.context.execution_options.preserve_order = True  # same clips, same order on a resume
                ds.context.enable_progress_bars = False  # per-step bars from every worker drown the log
                for rank, shard in zip(readers, ds.streaming_split(len(readers), equal=True), strict=True):
                    output[rank][name] = shard
            return output

    return PlacementDataConfig()


def ensure_ray(address: str | None = None) -> None:
    """Start (or connect to) Ray once per process, saying so: a local start takes ~10 s."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    log.info("starting Ray%s ...", f" (connecting to {address})" if address else " on this machine")
    t0 = time.perf_counter()
    if not address:  # a Ray of our own on this machine
        # Nothing preempts this machine's processes: spare Ray Train's preemption-watcher actor (one
        # more process to start before step 1). A cluster keeps it.
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        if not is_verbose():  # its token-auth notice is about clusters
            logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address=address, logging_level=logging.INFO if is_verbose() else logging.WARNING)
    quiet_ray_driver()
    res = ray.cluster_resources()
    log.info("Ray ready in %.1f s: %g CPUs, %g GPUs", time.perf_counter() - t0, res.get("CPU", 0), res.get("GPU", 0))


def train_worker(payload: WorkerPayload) -> None:
    """What each Ray Train worker runs: quiet Ray Train's per-report log, then the worker loop."""
    from vid2vid.platform import startup

    startup.mark("worker_start")
    quiet_ray_worker(payload.verbose)
    from vid2vid.platform.worker import train_loop_per_worker

    startup.mark("imported")
    train_loop_per_worker(payload)


def announce_steps(cfg: Config, manifest: dict[str, Any], run_name: str) -> StepPlan:
    """Say how many steps the run will take; a ``train.max_steps`` the schedule ends before is a warning."""
    placement = plan_placement(cfg.train.num_workers, cfg.train.gpus_per_worker, cfg.train.placement)  # fail fast
    plan = plan_steps(cfg.train, int(manifest["splits"].get("train", {}).get("clips", 0)),
                      len(placement.generator_ranks))
    announce = log.warning if 0 < plan.total < cfg.train.max_steps else log.info
    announce("run %s: %s", run_name, plan.describe(cfg.train.max_steps))
    return plan


def train(cfg: Config, shards: str | Path, extra_tags: dict[str, str] | None = None,
          parent_run_id: str | None = None, callbacks: list | None = None,
          parent_key: str | None = None, progress: bool = False,
          fault_hook: Callable[[int], None] | None = None) -> TrainResult:
    """Train on prepared shards; everything lands in MLflow and in ``<run_dir>/ray/<run_name>``.

    The run's tracking key is its name: the driver and rank 0 log into one MLflow run, also when the
    server was down at start (it is created when it answers; ``parent_key`` nests it then).
    ``progress=True`` logs the driver's progress line (the experiment scripts; a sweep's trials do not).
    ``fault_hook`` (tests only, e.g. :class:`vid2vid.training.faults.KillOnce`) is called on the workers
    with the step count before each step.
    """
    from vid2vid.datasets.shards import check_model_fits, load_manifest
    from vid2vid.platform import startup

    ensure_ray()
    startup.record("train_called")
    run_dir = storage.normalize(cfg.train.run_dir)
    run_name = cfg.train.run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    storage_path = storage.join(run_dir, "ray")
    run_folder = storage.join(storage_path, run_name)
    changes = check_resume(cfg, run_folder)
    manifest = load_manifest(shards)
    check_model_fits(cfg.model, manifest, shards)
    plan = announce_steps(cfg, manifest, run_name)

    tracker = open_tracking(cfg, run_name, run_dir, run_folder, changes, extra_tags, parent_run_id, parent_key)
    payload = WorkerPayload(config=to_dict(cfg), tracking=tracker.identity(),  # rank 0 joins this run (offline too)
                            clip_len=int(manifest["clip_len"]), sample_dir=storage.join(run_dir, "samples", run_name),
                            verbose=is_verbose(), fault_hook=fault_hook)
    log.info("starting %d Ray Train worker%s (%s, %s); DeepSpeed and the data stream start before step 1",
             cfg.train.num_workers, "s" * (cfg.train.num_workers > 1), cfg.train.placement,
             "GPU" if cfg.train.use_gpu else "CPU")
    fast_commits()
    with contextlib.ExitStack() as stack:
        payload.fit_time = startup.record("fit")
        if progress:
            shown = stack.enter_context(Progress(plan, cfg.train.progress_every_s, payload.fit_time))
            callbacks = [*(callbacks or []), shown.callback]
        try:
            result = torch_trainer(cfg, payload, shards, run_name, storage_path, callbacks).fit()
        except Exception:
            tracker.end("FAILED")
            replay_at_end(tracker)
            raise
        if progress:
            shown.wait_for(int((result.metrics or {}).get("step", 0)))
    checkpoint = (storage.location_of(result.checkpoint.filesystem, result.checkpoint.path)
                  if result.checkpoint is not None else None)
    if checkpoint:
        tracker.set_tags({"checkpoint": checkpoint})
    replay_at_end(tracker)
    return TrainResult(run_name, tracker.run_id, tracker.uri, checkpoint, dict(result.metrics or {}), storage_path,
                       plan)


def open_tracking(cfg: Config, run_name: str, run_dir: str, run_folder: str, changes: dict,
                  extra_tags: dict[str, str] | None, parent_run_id: str | None, parent_key: str | None):
    """The driver's side of the run's MLflow record: the run resumed (its id in the run folder) or a new
    one (created when the server answers), its params once, the config and any allowed change."""
    from vid2vid.platform.tracking import Tracker

    resumed_run_id = read_run_id(run_folder)
    tracker = Tracker(cfg.train.tracking_uri, cfg.train.experiment, run_name=run_name,
                      run_id=resumed_run_id, run_dir=run_dir, key=run_name, writer="driver",
                      parent_key=parent_key, run_id_file=run_id_path(run_folder),  # written once known
                      tags={"placement": cfg.train.placement, "preset": cfg.name, **(extra_tags or {}),
                            **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})})
    if resumed_run_id is None:  # MLflow params are write-once; a resumed run keeps its original ones
        tracker.log_params(flatten(cfg))
    record_config(cfg, run_folder, changes, tracker)
    if changes:
        log.warning("run %s resumes with a changed config (train.allow_config_change=true): %s", run_name,
                    "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items()))
    return tracker


def torch_trainer(cfg: Config, payload: WorkerPayload, shards: str | Path, run_name: str, storage_path: str,
                  callbacks: list | None):
    """Ray Train's TorchTrainer for this run: its workers, storage, failure budget and data stream."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from vid2vid.datasets.shards import training_dataset

    use_gpu = cfg.train.use_gpu
    return TorchTrainer(
        functools.partial(train_worker, payload),  # typed: Ray's train_loop_config must be a plain dict
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu,
            resources_per_worker={"GPU": cfg.train.gpus_per_worker} if use_gpu else {"CPU": cfg.train.cpus_per_worker}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2), callbacks=callbacks or None,
            logging_config=ray.train.LoggingConfig(log_level="INFO" if is_verbose() else "WARNING")),
        datasets={"train": training_dataset(shards, split="train", shuffle_seed=cfg.train.seed)},
        dataset_config=placement_data_config(cfg.train.placement, cfg.train.num_workers),
    )


def fast_commits() -> None:
    """Ray Train's controller takes up a worker's report, and commits its checkpoint, only when it polls
    the workers: every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default). Rank 0 waits for each
    commit before it logs the metrics the checkpoint covers (so a restart never logs a step twice), and
    a report soon after another waits for the first to be taken: each checkpoint cost ~1 s of idle
    wait. Polled every 0.25 s, the wait is ~0.03 s (benchmarks/train_overhead.py). Ray hands this
    variable from the driver to its controller at ``fit()``; a value the user set wins."""
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", COMMIT_POLL_S)


def replay_at_end(tracker) -> None:
    """End of job: what rank 0 and this driver kept while the server was down goes to MLflow now."""
    tracker.replay(wait=True)
    tracker.close()
    if tracker.pending():
        log.warning("%d tracking records of run %s wait in %s (MLflow at %s does not answer); when it does, "
                    "run: vid2vid sync-tracking run_dir=%s", tracker.pending(), tracker.key, tracker.journal.dir,
                    tracker.uri, tracker.run_location)
