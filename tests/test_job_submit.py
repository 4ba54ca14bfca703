"""`ray job submit --working-dir . -- python experiments/cityscapes.py preset=smoke` against `ray start --head`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).parent / "ray"

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    dash = free_port()
    start = subprocess.run(
        [str(RAY), "start", "--head", f"--port={free_port()}", "--num-cpus=2", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # the suite's own Ray holds the default agent ports: give this cluster's agents free ones
         f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
         f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, capture_output=True, text=True, timeout=180)
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
