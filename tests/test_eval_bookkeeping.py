"""Evaluating a checkpoint again: its step keeps one point per metric, and no outdated eval/skipped/* tag.

``log_to_run`` (platform/eval_records.py) is what every evaluation (``vid2vid evaluate``, the evaluator
beside training, the one after training) logs through; here it is given two evaluations of one step as
the service builds them: first without I3D weights, then with them. The end-to-end re-evaluation
through the command line is in test_experiment_script.py.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from vid2vid.config import load_config
from vid2vid.eval.service import EvalResult, protocol_description
from vid2vid.eval.worker import TofFlow
from vid2vid.platform.eval_records import RunTarget, log_to_run
from vid2vid.platform.tracking import Tracker

SKIPPED = {"eval/fid_i3d": "no I3D weights file", "eval/fvd": "no I3D weights file",
           "eval/fid_resnext": "no ResNeXt weights file"}


def evaluation(metrics: dict[str, float], skipped: dict[str, str], random: list[str]) -> EvalResult:
    """Step 3, 2 training clips of 8 frames, as the service returns it (the tags come from it)."""
    return EvalResult(3, "train", 2, 8, metrics, dict(skipped), random, real_clips_extracted=0, seconds=1.0,
                      protocol=protocol_description(load_config(["preset=smoke"]).eval.fid_frame),
                      tof_flow=TofFlow("dis", None, False))


def test_reevaluating_a_step_keeps_one_point_and_clears_stale_tags(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(["preset=smoke"])
    training = Tracker(uri, cfg.train.experiment, run_name="trained", run_dir=tmp_path)
    target = RunTarget(training.run_id, uri, tmp_path)
    ckpt = Path(tmp_path / "checkpoint")

    log_to_run(evaluation({"eval/warping_error": 0.125}, SKIPPED, []), target, cfg, ckpt)
    client = MlflowClient(uri)
    assert {"eval/skipped/fid_i3d", "eval/skipped/fvd", "eval/skipped/fid_resnext"} <= set(
        client.get_run(training.run_id).data.tags)

    # the same checkpoint again, now with (random test) I3D weights: FID-I3D and FVD are computed
    again = {"eval/warping_error": 0.125, "random_weights/eval/fid_i3d": 41.5, "random_weights/eval/fvd": 7.0}
    log_to_run(evaluation(again, {"eval/fid_resnext": SKIPPED["eval/fid_resnext"]}, ["i3d"]),
               target, cfg, ckpt)
    history = [(m.step, m.value) for m in client.get_metric_history(training.run_id, "eval/warping_error")]
    assert history == [(3, 0.125)]  # not logged a second time at step 3
    tags = client.get_run(training.run_id).data.tags
    assert "eval/skipped/fid_i3d" not in tags and "eval/skipped/fvd" not in tags  # computed now: stale
    assert tags["eval/skipped/fid_resnext"] == SKIPPED["eval/fid_resnext"] and "eval/random_weights" in tags
    assert client.get_run(training.run_id).data.metrics["random_weights/eval/fid_i3d"] == 41.5

    # a third time with real I3D weights: the random-weights tag of the earlier evaluation goes too
    log_to_run(evaluation({"eval/warping_error": 0.125, "eval/fid_i3d": 30.0}, {}, []),
               target, cfg, ckpt)
    tags = client.get_run(training.run_id).data.tags
    assert not [k for k in tags if k.startswith(("eval/skipped/", "eval/random_weights"))]
