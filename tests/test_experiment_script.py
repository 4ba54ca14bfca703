"""experiments/cityscapes.py as a user runs it (a subprocess, its own local Ray), several times in one folder:
a run is what the config asked for and says so, on a quiet screen.

One sequence shares the shards and the runs folder: a failing worker, a run whose train.max_steps the
schedule ends before, shards and resumes that disagree with the config (refused before Ray starts), a
resume allowed to change the config (continues the schedule, logs the diff), and the run found again by
``checkpoint=`` in each of its spellings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from vid2vid.platform.locate import locate_checkpoint

REPO = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO),
       "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}  # runs/mlflow.db
# 2 sequences x 8 frames, clip_len 4: 4 clips, one worker -> 4 steps per epoch; 2 epochs -> 8 steps.
SMALL = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
         "train.niter=1", "train.niter_decay=1", "eval.num_clips=2", "eval.clip_len=4", "train.progress_every_s=0"]

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def run(*args: str, cwd: Path, script: str = "experiments/cityscapes.py") -> subprocess.CompletedProcess:
    command = [sys.executable, str(REPO / script), *args] if script.endswith(".py") else \
        [sys.executable, "-m", "vid2vid.cli", script, *args]
    return subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=600)


def one_line_error(out: subprocess.CompletedProcess, prog: str = "experiments/cityscapes.py") -> str:
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and lines and lines[-1].startswith(f"{prog}: "), out.stdout[-2000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and len(lines) <= 3, out.stderr[-3000:]
    return lines[-1]


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_runs_say_what_they_do_and_refuse_what_was_not_asked(tmp_path):
    base = [*SMALL, f"data.out={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'runs'}"]
    corrupt = tmp_path / "vgg19.pth"
    corrupt.write_bytes(b"not a torch file")

    # 1. an error raised inside the Ray Train worker (VGG weights load there) reaches the user as one line
    failed = run(*base, f"model.vgg_weights={corrupt}", "train.run_name=broken", cwd=tmp_path)
    assert f"{corrupt}: not a plain tensor state dict" in one_line_error(failed)

    # 2. train.max_steps beyond the schedule: announced before the run, and the summary says why it stopped
    first = run(*base, "train.run_name=r", "train.max_steps=20", cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    shown = first.stdout + first.stderr
    assert "8 steps, not train.max_steps=20: the schedule ends first after 2 epochs" in first.stderr
    assert "finished: 8 steps (the schedule's end; train.max_steps=20 was not reached)" in first.stdout
    for step in range(1, 9):  # train.progress_every_s=0: one line per step, from the driver, on stdout
        assert f"step {step}/8  epoch {1 + (step > 4)}/2  G " in first.stdout
    assert "starting Ray" in first.stdout and "shards found at" in first.stdout  # prepared by the failed run
    assert "first step done" in first.stdout
    for noise in ("TrainingReport(", "Reporting training result", "PreemptionWatcher", "shm_comm_op built",
                  "exclude_resources", "Creating initial MLflow database tables"):
        assert noise not in shown, noise

    # 3. shards prepared with other data settings: refused before Ray starts, every differing key named
    line = one_line_error(run(*base, "data.resolution=64x32", "data.clip_len=3", cwd=tmp_path))
    assert "data.resolution=128x64 there, 64x32 asked; data.clip_len=4 there, 3 asked" in line
    assert "data.overwrite=true" in line and "starting Ray" not in line
    line = one_line_error(run("source=synthetic", f"out={tmp_path / 'shards'}", "resolution=64x32",
                              "synthetic_sequences=2", "synthetic_frames=8", "clip_len=4", cwd=tmp_path,
                              script="prepare"), prog="vid2vid prepare")
    assert "data.resolution=128x64 there, 64x32 asked" in line

    # 4. resuming run r with another config: refused, naming the keys
    line = one_line_error(run(*base, "train.run_name=r", "train.lr=1e-4", "train.niter=2", cwd=tmp_path))
    assert "run 'r' exists and was started with another config (train.niter: 1 -> 2; train.lr: 0.0002 -> 0.0001)" \
        in line and "train.allow_config_change=true" in line

    # 5. ... allowed: the schedule goes on from step 8 (epoch 3 of 3 now) at the new rate, the change is logged
    resumed = run(*base, "train.run_name=r", "train.max_steps=20", "train.lr=1e-4", "train.niter=2",
                  "train.allow_config_change=true", "--verbose", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "finished: 12 steps" in resumed.stdout
    assert "Reporting training result" in resumed.stdout + resumed.stderr  # --verbose shows Ray's lines again
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = mlflow.tracking.MlflowClient(uri)
    run_id = (tmp_path / "runs" / "ray" / "r" / "mlflow_run_id.txt").read_text().strip()
    lr = history(client, run_id, "lr")
    assert [s for s, _ in lr] == list(range(1, 13))  # every step once: none repeated, none lost
    # lr * (1 - (epoch - niter + 1) / (niter_decay + 1)) after niter epochs: epoch 0 at 2e-4, epoch 1 at 2e-4 / 2;
    # resumed at epoch 2 with lr 1e-4, niter 2, niter_decay 1: 1e-4 / 2 (not back to 2e-4)
    assert [v for _, v in lr] == pytest.approx([2e-4] * 4 + [1e-4] * 4 + [5e-5] * 4)
    tags = client.get_run(run_id).data.tags
    assert tags["config_changed"] == "train.niter: 1 -> 2; train.lr: 0.0002 -> 0.0001"
    artifacts = [a.path for a in client.list_artifacts(run_id, "config_changes")]
    assert len(artifacts) == 1
    change = json.loads(Path(client.download_artifacts(run_id, artifacts[0], str(tmp_path))).read_text())
    assert change["changed"] == {"train.niter": {"before": 1, "after": 2}, "train.lr": {"before": 2e-4, "after": 1e-4}}
    assert client.get_run(run_id).data.params["train.lr"] == "0.0002"  # params are write-once: the start's
    experiment = client.get_experiment(client.get_run(run_id).info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # 6. checkpoint= as a checkpoint folder, a run folder, a run name, an MLflow run id: the latest (step 12)
    folder = tmp_path / "runs" / "ray" / "r"
    steps = {p: json.loads((p / "vid2vid-checkpoint.json").read_text())["state"]["step"]
             for p in folder.glob("checkpoint_*") if p.is_dir()}  # beside Ray's checkpoint_manager_snapshot.json
    latest = max(steps, key=steps.get)
    assert steps[latest] == 12
    for spelling in (latest, folder, "r", run_id):
        assert locate_checkpoint(str(spelling), tmp_path / "runs", uri) == latest
    out = tmp_path / "by-run-id.mp4"  # and through the command line
    gen = run(f"checkpoint={run_id}", f"run_dir={tmp_path / 'runs'}", f"input={tmp_path / 'shards'}", f"out={out}",
              "max_frames=2", "progress=false", cwd=tmp_path, script="generate")
    assert gen.returncode == 0 and out.is_file(), gen.stderr[-3000:]
    # each evaluation (after each run) is one point at its step (re-evaluating: test_eval_bookkeeping.py)
    assert [s for s, _ in history(client, run_id, "eval/warping_error")] == [8, 12]
