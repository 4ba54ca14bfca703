"""The smoke experiment on a multi-node Ray cluster, as a user submits it, and a node lost mid-run.

One machine plays three: Ray's own multi-node test helper (``ray.cluster_utils.Cluster``) starts a head
node with no CPUs (the job's driver, Ray Train's controller) and two worker nodes with two CPUs each
(the train worker, Ray Data). Storage every node sees is S3 (a local S3-compatible endpoint, moto's
server): ``data.out`` and ``train.run_dir`` are ``s3://`` URIs. Tracking goes to a real ``mlflow
server`` with the basic-auth app and served artifacts; each node gets the tracking URI and credentials
through the raylet's environment, as ``cluster.yaml`` does. ``ray job submit`` runs
``experiments/cityscapes.py preset=smoke``; once step 1 is in MLflow (its checkpoint committed), the node whose train
worker is running is removed (its worker frozen first, so it cannot finish meanwhile), and the run
resumes on the other worker node from that checkpoint (``train.max_failures``).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from services import (
    BIN,
    cluster_credentials,
    environ,
    free_port,
    head_node_args,
    mlflow_server,
    ray_auth_env,
    s3_endpoint,
    s3_env,
)

from vid2vid import storage

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
RUN = "multinode"
MAX_STEPS = 6
ARGS = ["preset=smoke", f"train.run_name={RUN}", f"train.max_steps={MAX_STEPS}", "train.checkpoint_every=1",
        "train.max_failures=2", "train.experiment=multinode", "data.synthetic_sequences=2",
        "data.synthetic_frames=8", "data.clip_len=4", "data.flow_actors=1", "train.n_frames_total=4",
        "train.max_frames_total=4"]


# This test's own MLflow client waits for a busy server (the platform's default gives up after 5 s,
# so that a dead server costs training little: vid2vid/platform/mlflow_records.py)
PATIENT_CLIENT = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "120", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3"}


class Placement:
    """Which node's raylet each train worker and the driver descend from, sampled while the job runs."""

    def __init__(self, raylets: dict[int, str]):
        self.raylets = raylets  # raylet pid -> node name
        self.workers: dict[int, str] = {}  # train worker pid -> node name, in order first seen
        self.drivers: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def node_of(self, proc: psutil.Process) -> str | None:
        with contextlib.suppress(psutil.Error):
            for parent in proc.parents():
                if parent.pid in self.raylets:
                    return self.raylets[parent.pid]
        return None

    def sample(self) -> None:
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or [])
            table = (self.workers if "RayTrainWorker" in cmd
                     else self.drivers if "experiments/cityscapes.py" in cmd and "job" not in cmd else None)
            if table is not None and proc.pid not in table and (node := self.node_of(proc)) is not None:
                table[proc.pid] = node

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            self.sample()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def submit(env: dict[str, str], dashboard: int, out: Path, args: list[str]) -> subprocess.Popen:
    """``ray job submit`` (it follows the job's log until the end) in the background; retried while the
    job agent is still coming up after the cluster started."""
    cmd = [str(BIN / "ray"), "job", "submit", f"--address=http://127.0.0.1:{dashboard}", f"--working-dir={REPO}",
           "--", sys.executable, "experiments/cityscapes.py", *args]
    deadline = time.monotonic() + 120
    while True:
        with out.open("w") as log:
            job = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        while job.poll() is None and "Job submission server address" not in out.read_text():
            time.sleep(0.5)
        if job.poll() is None or "No available agent" not in out.read_text() or time.monotonic() > deadline:
            return job
        time.sleep(2)


def first_committed_step(client, experiment: str, job: subprocess.Popen, log: Path, timeout_s: float = 900) -> None:
    """Until step 1 is in MLflow: rank 0 sends a step's metrics only once Ray Train committed the
    checkpoint that covers it, so a worker lost after this resumes from a checkpoint."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and job.poll() is None:
        exp = client.get_experiment_by_name(experiment)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "step"):
            return
        time.sleep(0.2)
    raise AssertionError("no committed step in MLflow while the job ran:\n" + log.read_text()[-5000:])


@contextlib.contextmanager
def cluster(spec: dict, env: dict[str, str], temp_dir: str):
    """The head and worker nodes (tests/cluster_helper.py), starting: yields the helper process; its
    first line says they are up (:func:`nodes_up`)."""
    helper = subprocess.Popen([sys.executable, str(Path(__file__).with_name("cluster_helper.py")), json.dumps(spec)],
                              env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield helper
    finally:
        with contextlib.suppress(OSError):
            helper.stdin.write("shutdown\n")
            helper.stdin.flush()
        try:
            helper.wait(timeout=120)
        except subprocess.TimeoutExpired:
            helper.kill()
        for pid in map(int, subprocess.run(["pgrep", "-f", temp_dir], capture_output=True, text=True).stdout.split()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)


def nodes_up(helper: subprocess.Popen) -> dict[int, str]:
    """Wait for the cluster; raylet pid -> node name."""
    line = helper.stdout.readline()
    assert line, "the cluster did not start (see the test's stderr)"
    return {int(pid): name for pid, name in json.loads(line)["raylets"].items()}


def test_a_job_on_three_nodes_loses_its_training_node_and_finishes_on_another(tmp_path):
    from mlflow.tracking import MlflowClient

    t_start = time.monotonic()
    env = ray_auth_env()
    temp_dir = tempfile.mkdtemp(prefix="v2vmn", dir="/tmp")  # short: Ray's socket paths are limited
    # Addresses and credentials first, so that the nodes, the MLflow server and the S3 endpoint start
    # at the same time; the nodes get them in the raylet's environment, as cluster.yaml gives them.
    token, mlflow_port, s3_port = secrets.token_hex(16), free_port(), free_port()
    client_env = cluster_credentials("client", token)
    s3_vars = s3_env(f"http://127.0.0.1:{s3_port}")
    node_env = {**s3_vars, **client_env, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                "DS_ACCELERATOR": "cpu", "RAY_AUTH_MODE": "token", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    dashboard = free_port()
    spec = {"head": head_node_args(temp_dir, dashboard, num_cpus=0, env_vars=node_env,
                                   _system_config={"health_check_period_ms": 1000,
                                                   "health_check_failure_threshold": 5}),
            # a temp dir per node, as on separate machines: nodes sharing one unpack the job's
            # working_dir into the same folder at the same time, and a driver saw files missing
            "workers": {name: {"num_cpus": 2, "env_vars": node_env, "temp_dir": f"{temp_dir}/{name}"}
                        for name in ("worker-1", "worker-2")}}
    with cluster(spec, {**env, **node_env}, temp_dir) as helper, \
            mlflow_server(tmp_path / "mlflow", auth=True, port=mlflow_port, token=token) as server, \
            s3_endpoint(tmp_path / "s3", port=s3_port) as s3, \
            environ({**s3_vars, **client_env, **PATIENT_CLIENT}):
        assert server.client_env == client_env
        raylets = nodes_up(helper)
        placement = Placement(raylets)
        t_submit = time.monotonic()
        job_log = tmp_path / "job.log"
        data, run_dir = s3.uri("shards"), s3.uri("runs")
        job = submit({**env, **node_env}, dashboard, job_log,
                     [*ARGS, f"data.out={data}", f"train.run_dir={run_dir}"])
        client = MlflowClient(tracking_uri=server.uri)
        try:
            first_committed_step(client, "multinode", job, job_log)
            # the node training now is lost: its worker is frozen first (it must not finish meanwhile)
            placement.sample()
            (victim_pid, victim_node), = [(p, n) for p, n in placement.workers.items() if psutil.pid_exists(p)]
            os.kill(victim_pid, signal.SIGSTOP)
            helper.stdin.write(f"remove {victim_node}\n")
            helper.stdin.flush()
            assert helper.stdout.readline().strip() == f"removed {victim_node}"
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim_pid, signal.SIGKILL)
            t_removed = time.monotonic()
            job.wait(timeout=1500)
        finally:
            if job.poll() is None:
                job.kill()
            placement.stop()
        t_done = time.monotonic()
        log = job_log.read_text()
        print(f"\nmultinode: cluster up {t_submit - t_start:.0f}s, job {t_done - t_submit:.0f}s (node removed at "
              f"{t_removed - t_submit:.0f}s), train workers {placement.workers}, driver {placement.drivers}")

        assert job.returncode == 0 and re.search(r"Job '\S+' succeeded", log), log[-6000:]

        # where everything ran: the driver on the head, train workers only on worker nodes, the last one
        # on the node that remained
        assert set(placement.drivers.values()) == {"head"}, placement.drivers
        worker_nodes = list(placement.workers.values())
        survivor = "worker-2" if victim_node == "worker-1" else "worker-1"
        assert "head" not in worker_nodes and worker_nodes[0] == victim_node and worker_nodes[-1] == survivor, \
            placement.workers

        # checkpoints complete in the shared run_dir (S3), the last one at the last step
        from vid2vid.checkpoints import load_generator, read_manifest, read_run_id

        run_folder = storage.join(run_dir, "ray", RUN)
        manifests = sorted(p for p in storage.list_files(run_folder) if p.endswith("vid2vid-checkpoint.json"))
        last = max(manifests, key=lambda p: read_manifest(storage.parent(p)).step)
        last_dir = storage.parent(last)
        assert read_manifest(last_dir).step == MAX_STEPS
        assert read_manifest(last_dir).engines == ["discriminator", "generator"]
        files = [p[len(last_dir) + 1:] for p in storage.list_files(last_dir)]
        assert {"config.json", "generator/weights.pt", "discriminator/weights.pt"} <= set(files), files
        assert any(f.startswith("generator/state/") for f in files) and any(f.startswith("discriminator/state/")
                                                                             for f in files), files
        cfg, _ = load_generator(last_dir)  # the model rebuilds from S3 alone
        assert cfg.train.run_dir == run_dir and cfg.data.out == data

        # MLflow: one run, every step once (metrics are committed with checkpoints, also across the
        # node loss), the resume seen, the evaluation of the S3 checkpoint, the sample video
        (run,) = client.search_runs([client.get_experiment_by_name("multinode").experiment_id])
        assert run.info.run_name == RUN and run.info.status == "FINISHED"
        assert read_run_id(run_folder) == run.info.run_id
        steps = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "step")]
        assert sorted(steps) == [(s, float(s)) for s in range(1, MAX_STEPS + 1)]
        assert "restored/g_weight_abs_sum" in run.data.metrics  # a worker restored a checkpoint
        assert "eval/warping_error" in run.data.metrics
        (video,) = [a.path for a in client.list_artifacts(run.info.run_id, "samples")]
        local = Path(client.download_artifacts(run.info.run_id, video, str(tmp_path / "dl")))
        import av

        with av.open(str(local)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (64, 3 * 128, 3)  # labels | generated | real
        assert storage.read_bytes(storage.join(run_dir, "samples", RUN, Path(video).name)) == local.read_bytes()

        # the server refuses anyone without the credentials
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1", timeout=10)
        assert denied.value.code == 401

        step_times = [m.value for m in client.get_metric_history(run.info.run_id, "step_time_s")]
        logged = sorted((m.step, m.timestamp / 1000) for m in client.get_metric_history(run.info.run_id, "step"))
        walls = [b - a for (_, a), (_, b) in zip(logged, logged[1:], strict=False)]  # step + checkpoint to S3
        print(f"multinode: step_time_s median {statistics.median(step_times):.2f}s over {len(step_times)} steps "
              f"({', '.join(f'{t:.2f}' for t in step_times)}); between committed steps "
              f"{', '.join(f'{t:.2f}' for t in walls)}s (one includes the node loss)")
