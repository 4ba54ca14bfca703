"""One experiment end to end: prepare shards when missing -> train -> evaluate -> MLflow.

The job entry points (``experiments/cityscapes.py``, ``face.py``, ``pose.py``) are thin wrappers
around :func:`run_experiment`, so they behave the same locally and under ``ray job submit``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vid2vid import storage
from vid2vid.config import Config, load_config
from vid2vid.platform.evaluation import evaluate_run, start_evaluator
from vid2vid.platform.trainer import TrainResult, ensure_ray, train

log = logging.getLogger("vid2vid")


@dataclass
class ExperimentResult:
    train: TrainResult
    shards: str  # a folder or a URI (see vid2vid.storage), like every location below
    sample_videos: list[str]
    eval_metrics: dict[str, float]


def ensure_shards(cfg: Config) -> str:
    """Prepare ``cfg.data`` into ``cfg.data.out`` unless a complete manifest is already there."""
    from vid2vid.datasets.prepare import prepare
    from vid2vid.datasets.shards import MANIFEST

    out = storage.normalize(cfg.data.out)
    if storage.is_file(storage.join(out, MANIFEST)) and not cfg.data.overwrite:
        log.info("shards found at %s (data.overwrite=true rebuilds them)", out)
        return out
    summary = prepare(cfg.data, progress=True)
    print(summary.format(), flush=True)
    return out


def run_experiment(argv: list[str], default_preset: str) -> ExperimentResult:
    args = list(argv)
    if not any(a.startswith("preset=") for a in args):
        args.insert(0, f"preset={default_preset}")
    cfg = load_config(args)
    ensure_ray()
    shards = ensure_shards(cfg)
    if cfg.eval.during_training:  # an evaluator actor fed every checkpoint; training never waits for it
        evaluator = start_evaluator(cfg, shards)
        result = train(cfg, shards, callbacks=[evaluator.callback()])
        results = evaluator.wait()
        metrics = dict(results[-1].metrics) if results else {}
    else:
        result = train(cfg, shards)
        metrics = evaluate_run(cfg, result, shards)
    samples = storage.list_files(storage.join(storage.normalize(cfg.train.run_dir), "samples", result.run_name),
                                 suffix=".mp4")
    print_summary(cfg, result, samples, metrics)
    return ExperimentResult(result, shards, samples, metrics)


def print_summary(cfg: Config, result: TrainResult, samples: list[str], metrics: dict[str, float]) -> None:
    lines = [
        "",
        f"run {result.run_name} finished: {int(result.metrics.get('step', 0))} steps",
        f"  MLflow run     : {result.mlflow_run_id} (experiment {cfg.train.experiment!r})",
        f"  tracking URI   : {result.tracking_uri}",
        f"  checkpoint     : {result.checkpoint}",
        *(f"  sample video   : {p}" for p in samples),
        *(f"  {k:<15}: {v:.4f}" for k, v in sorted(metrics.items())),
        f"  browse the runs: mlflow ui --backend-store-uri {result.tracking_uri}",
    ]
    print("\n".join(lines), flush=True)
