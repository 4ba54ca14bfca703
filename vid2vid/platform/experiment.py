"""One experiment end to end: prepare shards when missing -> train -> evaluate -> MLflow.

The job entry points (``experiments/cityscapes.py``, ``face.py``, ``pose.py``) call :func:`main`, so
they behave the same locally and under ``ray job submit``. Everything that can be refused without Ray
is checked before Ray starts: the config, shards prepared with other data settings, a resume with a
changed config, a warm-start checkpoint that does not exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from vid2vid.config import Config, load_config
from vid2vid.platform import startup
from vid2vid.platform.evaluation import check_eval_split, evaluate_run, start_evaluator
from vid2vid.platform.trainer import TrainResult, ensure_ray, train

log = logging.getLogger("vid2vid")


@dataclass
class ExperimentResult:
    train: TrainResult
    shards: Path
    sample_videos: list[Path]
    eval_metrics: dict[str, float]


def ensure_shards(cfg: Config) -> Path:
    """Prepare ``cfg.data`` into ``cfg.data.out`` unless it already holds shards prepared with the same
    data settings; shards prepared otherwise are refused, naming each differing key (see
    ``prepare.check_prepared``), unless ``data.overwrite=true`` rebuilds them."""
    from vid2vid.console import is_verbose
    from vid2vid.datasets.prepare import check_prepared, prepare

    out = Path(cfg.data.out)
    manifest = check_prepared(cfg.data)
    if manifest is not None:
        clips = ", ".join(f"{k} {v['clips']} clips" for k, v in manifest["splits"].items())
        log.info("shards found at %s (%s), prepared with these data settings (data.overwrite=true rebuilds "
                 "them)", out, clips)
        return out
    log.info("preparing shards from %s into %s ...", cfg.data.source, out)
    summary = prepare(cfg.data, progress=is_verbose(), start_ray=ensure_ray)
    print(summary.format(), flush=True)
    return out


def preflight(cfg: Config) -> Config:
    """Refuse now, before Ray starts, what would fail later; resolve the warm-start checkpoint."""
    from vid2vid.datasets.prepare import check_prepared
    from vid2vid.platform.locate import locate_checkpoint
    from vid2vid.platform.resume import check_resume

    check_prepared(cfg.data)
    if cfg.train.run_name:
        check_resume(cfg, Path(cfg.train.run_dir).resolve() / "ray" / cfg.train.run_name)
    if cfg.train.warm_start:
        found = locate_checkpoint(cfg.train.warm_start, cfg.train.run_dir, cfg.train.tracking_uri)
        cfg = replace(cfg, train=replace(cfg.train, warm_start=str(found.resolve())))
    return cfg


def run_experiment(argv: list[str], default_preset: str) -> ExperimentResult:
    args = list(argv)
    if not any(a.startswith("preset=") for a in args):
        args.insert(0, f"preset={default_preset}")
    cfg = preflight(load_config(args))
    ensure_ray()
    startup.record("ray_ready")
    shards = ensure_shards(cfg)
    startup.record("shards_ready")
    check_eval_split(cfg, shards)  # no validation split: say so now, not after training
    if cfg.eval.during_training:  # an evaluator actor fed every checkpoint; training never waits for it
        evaluator = start_evaluator(cfg, shards)
        result = train(cfg, shards, callbacks=[evaluator.callback()], progress=True)
        results = evaluator.wait()
        metrics = dict(results[-1].metrics) if results else {}
    else:
        result = train(cfg, shards, progress=True)
        metrics = evaluate_run(cfg, result, shards)
    samples = sorted((Path(cfg.train.run_dir).resolve() / "samples" / result.run_name).glob("*.mp4"))
    print_summary(cfg, result, samples, metrics)
    return ExperimentResult(result, shards, samples, metrics)


def main(argv: list[str], default_preset: str, prog: str) -> int:
    """The experiment scripts' entry point: ``--verbose``, logging, one-line errors (exit status 2)."""
    from vid2vid.console import run_main

    def run(args: list[str]) -> int:
        run_experiment(args, default_preset)
        return 0

    return run_main(prog, run, argv)


def print_summary(cfg: Config, result: TrainResult, samples: list[Path], metrics: dict[str, float]) -> None:
    steps = int(result.metrics.get("step", 0))
    ended = ""
    if result.plan is not None and 0 < steps < cfg.train.max_steps:
        ended = f" (the schedule's end; train.max_steps={cfg.train.max_steps} was not reached)"
    lines = [
        "",
        f"run {result.run_name} finished: {steps} steps{ended}",
        f"  MLflow run     : {result.mlflow_run_id} (experiment {cfg.train.experiment!r})",
        f"  tracking URI   : {result.tracking_uri}",
        f"  checkpoint     : {result.checkpoint}",
        *(f"  sample video   : {p}" for p in samples),
        *(f"  {k:<15}: {v:.4f}" for k, v in sorted(metrics.items())),
        *browse_lines(result),
    ]
    print("\n".join(lines), flush=True)


def browse_lines(result: TrainResult) -> list[str]:
    """How to see the run: MLflow 3's UI starts in its GenAI mode, where an experiment opens on a traces
    overview; ``workflowType=machine_learning`` (or "Model training" in its sidebar) shows the runs."""
    server = result.tracking_uri if result.tracking_uri.startswith("http") else "http://127.0.0.1:5000"
    lines = [] if server == result.tracking_uri else [
        f"  browse the runs: mlflow ui --backend-store-uri {result.tracking_uri}   (then open the link below)"]
    try:
        from mlflow.tracking import MlflowClient

        experiment = MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).info.experiment_id
    except Exception:  # noqa: BLE001 - the store did not answer: the command is enough
        return lines
    link = f"{server.rstrip('/')}/#/experiments/{experiment}/runs?workflowType=machine_learning"
    return [*lines, f"  {'runs table' if lines else 'browse the runs':<15}: {link}"]
