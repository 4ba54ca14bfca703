"""An evaluation as the training run records it in MLflow: its metrics at the checkpoint's training
step, and ``eval/*`` tags that say what they were measured on and with.

Metrics land in THE TRAINING RUN: the run id comes from the caller, else from ``mlflow_run_id.txt``
that the trainer writes beside the checkpoints (a new run when there is none). Re-evaluating a
checkpoint keeps one point per metric at its step and no outdated ``eval/skipped/*`` tag.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path

from vid2vid import storage
from vid2vid.checkpoints import RUN_ID_FILE, read_run_id
from vid2vid.eval.service import EvalResult, training_run_dir
from vid2vid.platform.tracking import Tracker, resolve_tracking_uri

log = logging.getLogger("vid2vid.eval")


@dataclass(frozen=True)
class RunTarget:
    run_id: str | None
    tracking_uri: str
    run_dir: Path  # the training run_dir: default tracking store and statistics cache live there


@dataclass
class EvalRecord(EvalResult):
    """An :class:`EvalResult` and the MLflow run it was logged into."""

    run_id: str | None = None
    tracking_uri: str | None = None

    @classmethod
    def of(cls, result: EvalResult, run_id: str | None, tracking_uri: str | None) -> EvalRecord:
        return cls(**{f.name: getattr(result, f.name) for f in fields(EvalResult)}, run_id=run_id,
                   tracking_uri=tracking_uri)


def resolve_target(checkpoint_dir: str | Path, cfg, run_id: str | None = None,
                   tracking_uri: str | None = None) -> RunTarget:
    """The training run of a checkpoint at ``<run_dir>/ray/<run_name>/<checkpoint>``.

    Run id: ``run_id`` > ``<run_name>/mlflow_run_id.txt``. Tracking URI: ``tracking_uri`` > the run's
    ``train.tracking_uri`` > ``MLFLOW_TRACKING_URI`` > the trainer's default SQLite file in run_dir.
    """
    run_dir = training_run_dir(checkpoint_dir, cfg)  # a folder or a URI (s3://...)
    if run_id is None:
        run_id = read_run_id(storage.parent(storage.normalize(checkpoint_dir)))
    uri = resolve_tracking_uri(tracking_uri or cfg.train.tracking_uri, run_dir)
    return RunTarget(run_id, uri, storage.local_dir(run_dir))  # statistics cache and journal: local files


STYLES = {"sampled": "styles sampled from the per-class mixtures (styles.npz)",
          "real": "E's features of the real frames (reconstruction, *_recon)",
          "both": "sampled styles, and E's features of the real frames as *_recon"}


def eval_tags(result: EvalResult) -> dict[str, str]:
    """The run's ``eval/*`` tags of an evaluation: its split and clips, the protocol, what was skipped
    and why, and the warnings a reader of its numbers needs."""
    tags = {"eval/split": result.split, "eval/clips": f"{result.num_clips} x {result.clip_frames} frames",
            "eval/last_step": str(result.step), "eval/protocol": result.protocol}
    if result.tof_flow is not None:
        tof = result.tof_flow
        tags["eval/tof_flow"] = tof.method + (" (real flows from the shards)" if tof.real_from_shards else "")
    tags.update({f"eval/skipped/{m.split('/')[-1]}": why for m, why in result.skipped.items()})
    tags.update({f"eval/small_n/{m}": why for m, why in result.small_n.items()})
    if result.split_origin:
        tags["eval/split_origin"] = result.split_origin
    if result.split == "train":
        tags["eval/on_training_clips"] = ("eval.split=train: generated from TRAINING clips, which the model has "
                                          "seen; not a validation number")
    if result.styles is not None:
        tags["eval/styles"] = STYLES[result.styles]
    if result.random_weights:
        tags["eval/random_weights"] = (f"{', '.join(result.random_weights)}: random TEST weights; the "
                                       f"random_weights/* metrics are not FID and not comparable to any published "
                                       f"number")
    return tags


def log_to_run(result: EvalResult, target: RunTarget, cfg, checkpoint_dir: str | Path) -> str | None:
    """Tags, and metrics at ``result.step``, into the training run (a new run when there is none)."""
    tags = eval_tags(result)
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
