"""Reports to Ray Train at most every ``train.report_every_s`` seconds, always with a checkpoint and at
the end, while MLflow still gets every step once, also across killed workers.

Ray, MLflow and the trainer are imported inside the Ray test: the agreement test spawns processes that
import this module again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from spawn import spawn_collect

from vid2vid.config import ConfigError, load_config
from vid2vid.platform.cadence import ReportCadence

# Two clips of 4 frames, one worker: 2 steps per epoch, 2 epochs: 4 steps.
RUN = ["preset=smoke", "data.synthetic_sequences=1", "data.synthetic_frames=8", "data.clip_len=4",
       "train.n_frames_total=4", "train.max_frames_total=4", "train.niter=2", "train.niter_decay=0",
       "train.max_steps=0", "train.checkpoint_every=3", "train.max_failures=2", "train.report_every_s=3600"]


def report_recorder(path: Path):
    """A Ray Train callback (it runs in Ray's controller) appending each report rank 0 made to ``path``."""
    import ray.train

    class Recorder(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            poll_s = os.environ.get("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")  # how often this controller polls
            with open(path, "a") as f:
                f.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint is not None,
                                    "controller_poll_s": poll_s}) + "\n")

    return Recorder()


@pytest.mark.ray
def test_a_throttled_run_reports_checkpoints_and_its_end_to_ray_and_every_step_once_to_mlflow(
        ray_cluster, tmp_path):
    """Reports at most every hour: the first step, a checkpoint after step 3 and none due at step 4, the run's end; the
    worker is killed after step 2, before anything was committed, so steps 1-2 are redone. Ray sees
    step 3's checkpoint and the end's (holding step 4's losses); MLflow sees steps 1-4 once each.
    (Ranks agreeing on reports: the test below; test_train's 2-worker warm-start run goes through it.)"""
    import mlflow

    from vid2vid.checkpoints import read_state
    from vid2vid.datasets.prepare import prepare
    from vid2vid.platform.trainer import COMMIT_POLL_S, train
    from vid2vid.training.faults import KillOnce

    cfg = load_config([*RUN, f"data.out={tmp_path / 'shards'}", f"train.run_dir={tmp_path}"])
    prepare(cfg.data, progress=False)
    reports = tmp_path / "reports.jsonl"
    result = train(cfg, cfg.data.out, callbacks=[report_recorder(reports)],
                   fault_hook=KillOnce((2,), str(tmp_path / "kills.json")))

    assert json.loads((tmp_path / "kills.json").read_text()) == [2]
    seen = [json.loads(line) for line in reports.read_text().splitlines()]
    reports = [(int(r["metrics"]["step"]), r["checkpoint"]) for r in seen]
    # besides each process's first step (startup metrics; the killed process's may not reach Ray
    # before it dies), only checkpoints report
    assert [r for r in reports if r != (1, False)] == [(3, True), (4, True)]
    assert (1, False) in reports
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))
               for key in ("step", "G/total", "D/total")}
    assert [s for s, _ in history["step"]] == [1, 2, 3, 4]
    assert [s for s, _ in history["G/total"]] == [1, 2, 3, 4]
    for key in ("G/total", "D/total"):  # the end's report carries the last step's losses, as MLflow has them
        assert seen[-1]["metrics"][key] == pytest.approx(history[key][-1][1], rel=1e-6)
        assert result.metrics[key] == pytest.approx(history[key][-1][1], rel=1e-6)
    assert read_state(result.checkpoint)["step"] == 4, "the run's end is checkpointed"
    # Ray's controller polled every 0.25 s, not its 2 s default: a commit costs no ~1-2 s of idle wait
    assert {r["controller_poll_s"] for r in seen} == {COMMIT_POLL_S}


def test_a_poll_interval_the_user_set_wins(monkeypatch):
    from vid2vid.platform.trainer import fast_commits

    monkeypatch.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "1.5")
    fast_commits()
    assert os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] == "1.5"


def _agree(rank: int, store: str, wishes: list[tuple[float, bool]], q) -> None:
    """One rank: a clock that reads ``wishes[i][0]`` at the i-th decision; returns every decision."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    times = iter([0.0] + [t for t, _ in wishes])  # the start, then one reading per decision
    cadence = ReportCadence(10.0, dist.group.WORLD, clock=lambda: next(times))
    q.put((rank, [cadence.due(checkpoint) for _, checkpoint in wishes]))
    dist.destroy_process_group()


def test_ranks_whose_clocks_disagree_make_the_same_reports(tmp_path):
    """Rank 0's clock runs over the 10 s interval at t=11, rank 1's only at t=12: both report at both
    decisions where either wants to; a checkpoint always reports; between, neither does."""
    rank0 = [(0.0, False), (5.0, False), (11.0, False), (12.0, False), (13.0, True), (14.0, False), (25.0, False)]
    rank1 = [(0.0, False), (5.0, False), (9.0, False), (12.0, False), (13.0, True), (14.0, False), (20.0, False)]
    got = spawn_collect(_dispatch, 2, (str(tmp_path / "store"), rank0, rank1), timeout=120)
    # the first step always reports (at 0); rank 0 wants at 11 (11 - 0 >= 10), rank 1 at 9 does not;
    # then each counts from its own clock's
    # reading of that report: at 12 neither wants, 13 checkpoints; at 25 rank 0 (25 - 13) wants, rank 1
    # at 20 (20 - 13) does not.
    assert got[0] == got[1] == [True, False, True, False, True, False, True]


def _dispatch(rank: int, store: str, rank0, rank1, q) -> None:
    _agree(rank, store, rank0 if rank == 0 else rank1, q)


def test_report_every_s_must_not_be_negative():
    with pytest.raises(ConfigError, match="train.report_every_s"):
        load_config(["preset=smoke", "train.report_every_s=-1"])
    assert load_config(["preset=smoke", "train.report_every_s=0"]).train.report_every_s == 0


def test_one_rank_reports_every_step_at_0_and_on_its_first_step_and_checkpoints_only_otherwise():
    clock = iter([0.0, 1.0, 2.0, 3.0])
    every_step = ReportCadence(0.0, clock=lambda: next(clock))
    assert [every_step.due(False) for _ in range(3)] == [True, True, True]
    hourly = ReportCadence(3600.0)
    assert [hourly.due(c) for c in (False, False, True, False)] == [True, False, True, False]  # the first step
