"""The evaluation service on the platform: after training, beside it, and from the command line.

After training, ``experiment.run_experiment`` calls :func:`evaluate_run` on the final checkpoint.

Beside training, a Ray actor evaluates each checkpoint the moment Ray Train has persisted it, and
training never waits for the evaluation (only for a copy of the generator weights).
``run_experiment`` (hence ``experiments/cityscapes.py``) wires it, when ``eval.during_training=true``, as::

    evaluator = start_evaluator(cfg, shards)                   # before train(); returns at once
    result = train(cfg, shards, callbacks=[evaluator.callback()])  # -> RunConfig(callbacks=...)
    evaluator.wait()                                            # the last checkpoints' metrics land

``evaluator.callback()`` is a ``ray.train.UserCallback``: Ray Train's controller calls its
``after_report`` with every persisted checkpoint, and it forwards ``(path, metrics["step"])`` to the
actor's ``submit``, waiting only for the staging copy: the actor copies the checkpoint's small
evaluation files (``config.json``, ``generator/weights.pt``) at once, because
``CheckpointConfig(num_to_keep=2)`` may delete the directory before its turn comes. It evaluates the
queue in order on a background thread, and when it falls behind by more than ``max_pending``
checkpoints it drops the oldest queued ones (logged). The last checkpoint of a run is evaluated
there too, so skip ``evaluate_run`` after training when the evaluator ran beside it.

Each evaluation is computed by :func:`vid2vid.eval.service.evaluate_checkpoint` and recorded here
(:func:`evaluate_and_log`, with ``eval_records.py``). The run id comes from ``mlflow_run_id.txt`` beside
the checkpoints, which the trainer writes before training starts. The evaluation pools need free
resources: on a cluster whose every GPU trains, evaluations queue until GPUs free up (training still
never waits).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from vid2vid import storage
from vid2vid.checkpoints import CONFIG, MANIFEST, WEIGHTS, checkpoint_step, load_config, weights_path
from vid2vid.config import Config, ConfigError, EvalConfig, apply_mapping, read_value, split_key_values
from vid2vid.eval.service import evaluate_checkpoint
from vid2vid.generate.styles import STYLES_FILE
from vid2vid.platform.eval_records import EvalRecord, log_to_run, resolve_target

log = logging.getLogger("vid2vid.eval")
STAGE_TIMEOUT_S = 60
STAGED = (CONFIG, f"generator/{WEIGHTS}", MANIFEST, STYLES_FILE)  # styles: a multimodal model's


def evaluate_and_log(checkpoint_dir: str | Path, shards: str | Path, eval_cfg: EvalConfig | None = None, *,
                     step: int | None = None, run_id: str | None = None, tracking_uri: str | None = None,
                     run_dir: str | Path | None = None, **service_kwargs) -> EvalRecord:
    """Evaluate one checkpoint and log the metrics to its training run at its training step.

    ``run_id`` and ``tracking_uri`` override the training run's (:func:`eval_records.resolve_target`);
    ``run_dir`` the local folder of the statistics cache and the tracking journal. ``service_kwargs``
    go to :func:`evaluate_checkpoint` (``input_sizes``, ``actors``, ``cpus_per_actor``).
    """
    checkpoint_dir = storage.normalize(checkpoint_dir)  # a folder or a URI
    cfg = load_config(checkpoint_dir)
    target = resolve_target(checkpoint_dir, cfg, run_id, tracking_uri)
    if run_dir is not None:
        target = replace(target, run_dir=Path(run_dir))
    result = evaluate_checkpoint(checkpoint_dir, shards, eval_cfg, step=step, run_dir=target.run_dir,
                                 checkpoint_cfg=cfg, **service_kwargs)
    t0 = time.perf_counter()
    logged_to = log_to_run(result, target, cfg, checkpoint_dir)
    result.timings["mlflow"] = time.perf_counter() - t0
    result.seconds += result.timings["mlflow"]
    return EvalRecord.of(result, logged_to, target.tracking_uri)


def evaluate_run(cfg: Config, result: Any, shards: str | Path) -> dict[str, float]:
    """Evaluate a finished run's last checkpoint (``TrainResult``) into its own MLflow run; no
    metrics when the run saved no checkpoint."""
    if result.checkpoint is None:
        return {}
    out = evaluate_and_log(result.checkpoint, shards, cfg.eval, run_id=result.mlflow_run_id,
                           tracking_uri=result.tracking_uri)
    return out.metrics


class Evaluator:
    """The actor's body (wrapped by ``ray.remote`` in :func:`start_evaluator`)."""

    def __init__(self, shards: str, eval_cfg: EvalConfig | None, stage_dir: str | None = None,
                 run_id: str | None = None, tracking_uri: str | None = None, max_pending: int = 2,
                 service_kwargs: dict[str, Any] | None = None):
        self.shards, self.eval_cfg = shards, eval_cfg
        self.run_id, self.tracking_uri, self.max_pending = run_id, tracking_uri, max_pending
        self.kwargs = service_kwargs or {}
        self.stage = Path(stage_dir or tempfile.mkdtemp(prefix="vid2vid-eval-"))
        self.pending: list[dict[str, Any]] = []
        self.results: list[EvalRecord] = []
        self.errors: list[str] = []
        self.busy = False
        self.cond = threading.Condition()
        threading.Thread(target=self._loop, daemon=True, name="vid2vid-evaluator").start()

    def submit(self, checkpoint_dir: str, step: int | None = None) -> bool:
        """Stage the checkpoint and queue it; returns without evaluating (False if it was unusable)."""
        src = checkpoint_dir  # a folder or a URI (a checkpoint in S3)
        try:
            cfg = load_config(src)
            weights_path(src, "generator")  # fails now, naming the file, rather than in the queue
            step = checkpoint_step(src, step)
            target = resolve_target(src, cfg, self.run_id, self.tracking_uri)
            staged = self.stage / f"{storage.name(src)}-{time.monotonic_ns()}"
            for name in STAGED:
                if storage.is_file(storage.join(src, name)):
                    (staged / name).parent.mkdir(parents=True, exist_ok=True)
                    (staged / name).write_bytes(storage.read_bytes(storage.join(src, name)))
        except Exception as exc:  # noqa: BLE001 - one bad checkpoint must not stop the evaluator
            self._error(f"{checkpoint_dir}: not evaluated: {exc}")
            return False
        job = {"dir": staged, "source": str(src), "step": step, "target": target}
        with self.cond:
            self.pending.append(job)
            while len(self.pending) > self.max_pending:
                dropped = self.pending.pop(0)
                log.warning("evaluator behind training: skipping checkpoint %s", dropped["source"])
                shutil.rmtree(dropped["dir"], ignore_errors=True)
            self.cond.notify_all()
        return True

    def report(self) -> dict[str, Any]:
        """Results and errors so far; ``idle`` when nothing is queued or running."""
        with self.cond:
            return {"results": list(self.results), "errors": list(self.errors), "pending": len(self.pending),
                    "idle": not (self.pending or self.busy)}

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending:
                    self.cond.wait()
                job = self.pending.pop(0)
                self.busy = True
            try:
                t = job["target"]
                res = evaluate_and_log(job["dir"], self.shards, self.eval_cfg, step=job["step"], run_id=t.run_id,
                                       tracking_uri=t.tracking_uri, run_dir=t.run_dir, **self.kwargs)
                with self.cond:
                    self.results.append(res)
            except Exception as exc:  # noqa: BLE001 - logged; the next checkpoint is still evaluated
                self._error(f"{job['source']}: evaluation failed: {type(exc).__name__}: {exc}")
            finally:
                shutil.rmtree(job["dir"], ignore_errors=True)
                with self.cond:
                    self.busy = False
                    self.cond.notify_all()

    def _error(self, msg: str) -> None:
        log.error(msg)
        with self.cond:
            self.errors.append(msg)


class EvaluatorHandle:
    """Driver-side handle. The actor runs one method at a time, in the order each caller sent them
    (every method is quick: evaluation runs on the actor's own thread), so a ``wait`` sent after a
    ``submit`` always sees that checkpoint."""

    def __init__(self, actor):
        self.actor = actor

    def submit(self, checkpoint_dir: str | Path, step: int | None = None):
        """Queue a checkpoint; returns an ObjectRef at once (``ray.get`` it for the staging outcome)."""
        return self.actor.submit.remote(str(checkpoint_dir), step)

    def wait(self, timeout_s: float | None = None, poll_s: float = 0.5) -> list[EvalRecord]:
        """Block until every queued checkpoint is evaluated (or ``timeout_s``); all results so far."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not (rep := self.report())["idle"] and (deadline is None or time.monotonic() < deadline):
            time.sleep(poll_s)
        return rep["results"]

    def report(self) -> dict[str, Any]:
        import ray

        return ray.get(self.actor.report.remote())

    def callback(self):
        """A ``ray.train.UserCallback`` forwarding each persisted checkpoint to this evaluator."""
        return make_callback(self.actor)


def make_callback(actor):
    import ray.train

    class EvaluationCallback(ray.train.UserCallback):
        def __init__(self, actor):
            self.actor = actor

        def after_report(self, run_context, metrics, checkpoint):
            import ray

            if checkpoint is None:
                return
            step = (metrics[0] if metrics else {}).get("step")
            where = storage.location_of(checkpoint.filesystem, checkpoint.path)  # keeps s3:// for a URI run_dir
            ref = self.actor.submit.remote(where, None if step is None else int(step))
            # Wait for the staging copy only (not the evaluation): once train() returns, every
            # checkpoint is queued, so the driver's evaluator.wait() cannot miss the last one.
            try:
                ray.get(ref, timeout=STAGE_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                log.warning("evaluator: staging %s takes over %d s; not waiting for it", checkpoint.path,
                            STAGE_TIMEOUT_S)

    return EvaluationCallback(actor)


def start_evaluator(cfg: Config, shards: str | Path, run_id: str | None = None, tracking_uri: str | None = None,
                    max_pending: int = 2, **service_kwargs) -> EvaluatorHandle:
    """Start the evaluator actor (no CPU reserved: its Ray Data pools reserve their own resources).

    ``service_kwargs`` go to :func:`evaluate_checkpoint` (``actors``, ``cpus_per_actor``, ...).
    """
    import ray

    actor_cls = ray.remote(num_cpus=0)(Evaluator)
    actor = actor_cls.remote(storage.normalize(shards), cfg.eval, None, run_id, tracking_uri, max_pending,
                             service_kwargs)
    return EvaluatorHandle(actor)


def evaluate_command(args: list[str]) -> int:
    """``vid2vid evaluate checkpoint=DIR shards=DIR [step=N] [run_id=ID] [tracking_uri=URI] [eval.KEY=V]``.

    ``checkpoint=`` reaches here as a folder: ``vid2vid.cli`` resolves a run folder, run name or MLflow run id.

    Other ``key=value`` arguments override the checkpoint's own config; bare keys are ``eval`` keys
    (``i3d_weights=...`` means ``eval.i3d_weights=...``).
    """
    from vid2vid.platform.trainer import ensure_ray

    opts = {"checkpoint": None, "shards": None, "step": None, "run_id": None, "tracking_uri": None}
    overrides = {}
    for kv in split_key_values(args):
        if kv.key in opts:
            opts[kv.key] = kv.text
        else:
            overrides[kv.key if "." in kv.key else f"eval.{kv.key}"] = read_value(kv.text)
    if not opts["checkpoint"] or not opts["shards"]:
        raise ConfigError("checkpoint= and shards=DIR are required (checkpoint: a checkpoint folder, a run folder, "
                          "a run name or an MLflow run id)")
    cfg = apply_mapping(load_config(opts["checkpoint"]), overrides)
    ensure_ray()
    res = evaluate_and_log(opts["checkpoint"], opts["shards"], cfg.eval,
                           step=None if opts["step"] is None else int(opts["step"]),
                           run_id=opts["run_id"], tracking_uri=opts["tracking_uri"])
    print(format_result(res))
    return 0


def format_result(res: EvalRecord) -> str:
    """One line per metric; a Fréchet distance with its 95% interval and clip count."""
    lines = [f"evaluation at step {res.step}: {res.num_clips} clips x {res.clip_frames} frames, "
             f"{res.split} split, {res.seconds:.1f} s"]
    for k, v in sorted(res.metrics.items()):
        if k.endswith(("/ci95_low", "/ci95_high", "/clips")):
            continue
        est = res.estimates.get(k)
        ci = "" if est is None or est.low is None else f"  95% [{est.low:.4g}, {est.high:.4g}], {est.clips} clips"
        lines.append(f"  {k:<32} {v:.6g}{ci}")
    lines += [f"  not computed: {k}: {why}" for k, why in sorted(res.skipped.items())]
    lines += [f"  warning: eval/small_n/{m}: {why}" for m, why in sorted(res.small_n.items())]
    lines.append(f"  MLflow run {res.run_id} at {res.tracking_uri}")
    return "\n".join(lines)


def check_eval_split(cfg: Config, shards: str | Path) -> None:
    """Fail before training when the shards lack the split evaluation will read (``eval.split``),
    rather than after hours of it; the error says how to prepare a validation split."""
    from vid2vid.datasets.shards import load_manifest
    from vid2vid.eval.clips import choose_split

    choose_split(load_manifest(shards), cfg.eval.split, f"{shards}/manifest.json")
