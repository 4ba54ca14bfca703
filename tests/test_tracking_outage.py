"""A tracking server outage, on the paths users run: Ray Train runs and a Ray Tune sweep log to an MLflow
server that is down, then comes back; every record ends in its own run, once.

The server is a real ``mlflow server`` (SQLite store). Runs are given the address of a :class:`Switch`:
while it is down nothing listens there (connections are refused, as with a stopped server); once
up, it forwards to the server.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from services import mlflow_server

from vid2vid.checkpoints import read_run_id
from vid2vid.config import load_config
from vid2vid.datasets.prepare import prepare
from vid2vid.platform.journal import TRACKING_DIR, RunJournal, find_journals

pytestmark = pytest.mark.ray

REPO = Path(__file__).resolve().parent.parent
SMOKE = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
         "train.n_frames_total=4", "train.max_frames_total=4", "train.max_steps=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Switch:
    """127.0.0.1:<port> refuses connections while down and forwards them to ``target`` while up."""

    def __init__(self, target: int):
        self.port, self.target = _free_port(), target
        self.uri = f"http://127.0.0.1:{self.port}"
        self._listener: socket.socket | None = None
        self._open: list[socket.socket] = []
        self.flipped = threading.Event()

    def up(self) -> None:
        srv = socket.socket()
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", self.port))
        srv.listen(64)
        self._listener = srv
        threading.Thread(target=self._accept, args=(srv,), daemon=True).start()
        self.flipped.set()

    def down(self) -> None:
        for s in [*([self._listener] if self._listener else []), *self._open]:
            _close(s)
        self._listener, self._open = None, []

    def up_when(self, condition) -> threading.Thread:
        """Switch on from a thread as soon as ``condition()`` holds (checked every 20 ms)."""
        def watch():
            while not condition():
                time.sleep(0.02)
            self.up()

        t = threading.Thread(target=watch, daemon=True)
        t.start()
        return t

    def _accept(self, srv: socket.socket) -> None:
        while True:
            try:
                client, _ = srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._open += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pipe, args=(a, b), daemon=True).start()


def _pipe(a: socket.socket, b: socket.socket) -> None:
    try:
        while data := a.recv(65536):
            b.sendall(data)
    except OSError:
        pass
    _close(a)
    _close(b)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in accept/recv
    except OSError:
        pass
    s.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A real ``mlflow server`` on a free port (SQLite store, served artifacts): its URI."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as running:
        yield running.uri


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "smoke"
    prepare(load_config([*SMOKE, f"data.out={out}"]).data, progress=False)
    return out


def _steps(client, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, "step"))


def _journal_records(folder: Path, writer: str) -> list[dict]:
    (path,) = folder.glob(f"*-{writer}.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_driver_replays_at_the_end_of_the_job_once_the_server_is_back(shards, server, tmp_path):
    """Down when the run starts (no run id: rank 0 logs offline too), back while rank 0 trains: after
    ``train()`` the run has everything, without ``sync-tracking``."""
    from mlflow.tracking import MlflowClient

    from vid2vid.platform.trainer import train

    switch = Switch(int(server.rsplit(":", 1)[1]))
    journal = tmp_path / TRACKING_DIR / "late"
    switch.up_when(lambda: any(journal.glob("*-rank0.jsonl")))  # rank 0 has started, offline
    cfg = load_config([*SMOKE, f"train.run_dir={tmp_path}", f"train.tracking_uri={switch.uri}", "train.run_name=late",
                       "train.experiment=outage-train", "train.checkpoint_every=1"])
    try:
        with pytest.warns(RuntimeWarning, match="unreachable"):
            result = train(cfg, shards)
    finally:
        switch.down()
    assert switch.flipped.is_set()
    assert _journal_records(journal, "driver")[1]["kind"] == "start"  # the driver started offline

    client = MlflowClient(tracking_uri=server)
    runs = client.search_runs([client.get_experiment_by_name("outage-train").experiment_id])
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]
    run = runs[0]
    assert run.info.run_name == "late" and run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "2" and run.data.params["model.ngf"] == "16"
    assert run.data.tags["checkpoint"] == result.checkpoint and run.data.tags["preset"] == "smoke"
    assert _steps(client, run.info.run_id) == [(1, 1.0), (2, 2.0)]
    assert any(a.path.endswith(".mp4") for a in client.list_artifacts(run.info.run_id, "samples"))
    assert read_run_id(tmp_path / "ray" / "late") == run.info.run_id  # evaluate/resume find the run
    assert RunJournal(tmp_path / TRACKING_DIR, "late").pending_count() == 0


def test_a_sweep_under_an_outage_then_sync_tracking_puts_each_trial_in_its_own_run(shards, server, tmp_path):
    """Two trials and the parent, all while the server is down; then the CLI, twice."""
    from mlflow.tracking import MlflowClient

    from vid2vid.platform.sweep import TrialSpec, parameter_counts, parse_sweep_args, run_sweep, trial_config

    switch = Switch(int(server.rsplit(":", 1)[1]))
    cfg, sweep = parse_sweep_args([*SMOKE, f"data.out={shards}", f"train.run_dir={tmp_path}",
                                   f"train.tracking_uri={switch.uri}", "train.experiment=outage-sweep",
                                   "variants=[full,no_flow_warping]", "name=dark", "evaluate=false"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = run_sweep(cfg, sweep, shards)
    assert result.errors == {} and result.parent_run_id is None
    client = MlflowClient(tracking_uri=server)
    assert client.get_experiment_by_name("outage-sweep") is None  # nothing reached MLflow
    labels = {"full": "dark-full-s0", "no_flow_warping": "dark-no_flow_warping-s0"}
    for label in labels.values():  # rank 0 logged every step although the run had no id
        metrics = [r for r in _journal_records(tmp_path / TRACKING_DIR / label, "rank0") if r["kind"] == "metrics"]
        assert [r["step"] for r in metrics] == [1, 2] and all(r["run_id"] is None for r in metrics)
    assert {j.key for j in find_journals(tmp_path) if j.pending_count()} == {"sweep:dark", *labels.values()}

    switch.up()
    try:
        first = _sync(tmp_path)
        state = _runs(client, "outage-sweep")
        second = _sync(tmp_path)
        assert _runs(client, "outage-sweep") == state  # running it again adds nothing
    finally:
        switch.down()
    assert first.returncode == 0 and "0 pending" in first.stdout, first.stdout + first.stderr
    assert second.returncode == 0 and "0 records pushed" in second.stdout, second.stdout + second.stderr

    assert set(state) == {"dark", *labels.values()}
    parent_id, status, params, tags, metrics, artifacts = state["dark"]
    assert status == "FINISHED" and tags["sweep/role"] == "parent" and tags["sweep/trials"] == "2"
    assert params["sweep.name"] == "dark"
    assert {"comparison/comparison.md", "comparison/trials.csv"} <= artifacts
    assert (tmp_path / "sweeps" / "dark" / "parent_run_id.txt").read_text() == parent_id
    for variant, label in labels.items():
        run_id, status, params, tags, metrics, artifacts = state[label]
        assert status == "FINISHED" and tags["mlflow.parentRunId"] == parent_id
        assert tags["variant"] == variant and params["variant"] == variant
        assert params["model.flow_warping"] == str(variant != "no_flow_warping")
        assert metrics["step"] == [(1, 1.0), (2, 2.0)]  # its own two steps, once: none of the other trial's
        want = parameter_counts(trial_config(cfg, TrialSpec(variant, 0)))
        assert {k: metrics[k] for k in want} == {k: [(0, float(v))] for k, v in want.items()}
        assert any(a.startswith("samples/") and a.endswith(".mp4") for a in artifacts)
        assert Path(tags["checkpoint"]).parent.name == label
        assert read_run_id(tmp_path / "ray" / label) == run_id
    assert all(j.pending_count() == 0 for j in find_journals(tmp_path))


def _sync(run_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vid2vid.cli", "sync-tracking", f"run_dir={run_dir}"],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, PYTHONPATH=str(REPO)))


def _runs(client, experiment: str) -> dict[str, tuple]:
    """name -> (run id, status, params, tags, metric histories, artifact paths) of every run."""
    exp = client.get_experiment_by_name(experiment)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        rid = r.info.run_id
        histories = {k: sorted((m.step, m.value) for m in client.get_metric_history(rid, k)) for k in r.data.metrics}
        artifacts = {a.path for folder in ("samples", "comparison") for a in client.list_artifacts(rid, folder)}
        assert r.info.run_name not in out, f"two runs named {r.info.run_name}"
        out[r.info.run_name] = (rid, r.info.status, r.data.params, r.data.tags, histories, artifacts)
    return out
