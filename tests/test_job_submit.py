"""`ray job submit --working-dir . -- python experiments/cityscapes.py preset=smoke` against `ray start --head`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from services import free_port, ray_auth_env, ray_start_head

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def kill_cluster(temp_dir: str) -> None:
    """Stop only this test's cluster (``ray stop`` would also stop the suite's shared Ray)."""
    out = subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()
    for pid in map(int, out):
        if pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_ray_job_submit_runs_the_smoke_experiment_to_success(tmp_path):
    # A short temp dir: Ray's unix sockets live under it and paths are limited to ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="v2vjob", dir="/tmp")
    env = ray_auth_env()  # token auth on, as on a cluster
    dash = free_port()
    start = subprocess.run(ray_start_head(temp_dir, dash), env=env, capture_output=True, text=True, timeout=180)
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        cmd = [str(RAY), "job", "submit", f"--address=http://127.0.0.1:{dash}", f"--working-dir={REPO}", "--",
               sys.executable, "experiments/cityscapes.py", "preset=smoke", f"data.out={tmp_path / 'shards'}",
               f"train.run_dir={tmp_path / 'runs'}", "train.max_steps=2", "data.synthetic_sequences=2",
               "data.synthetic_frames=8", "data.clip_len=4"]
        deadline = time.monotonic() + 120
        while True:  # the job agent comes up a few seconds after `ray start` returns
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
            if "No available agent" not in job.stderr or time.monotonic() > deadline:
                break
            time.sleep(2)
        log = job.stdout + job.stderr
        assert job.returncode == 0 and re.search(r"Job '\S+' succeeded", log), log[-5000:]
        assert "mlflow ui --backend-store-uri" in log
        assert list((tmp_path / "runs" / "samples").rglob("*.mp4")), "the job wrote its sample video"
    finally:
        kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
