"""MLflow tracking: runs land in a SQLite store; a dead server costs a warning, never the run."""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest

from vid2vid.platform.tracking import (
    MAX_PARAM_VALUE,
    OFFLINE_FILE,
    REJECTED_FILE,
    Tracker,
    is_connection_error,
    resolve_tracking_uri,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """One run folder whose default SQLite store all tests share (creating one costs seconds)."""
    return tmp_path_factory.mktemp("run")


@pytest.fixture(autouse=True)
def no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def dead_uri() -> str:
    with socket.socket() as s:  # a port nothing listens on once the socket is closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_resolve_tracking_uri_precedence(monkeypatch, tmp_path):
    assert resolve_tracking_uri(None, tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://head:5000")
    assert resolve_tracking_uri(None, tmp_path) == "http://head:5000"
    assert resolve_tracking_uri("sqlite:///x.db", tmp_path) == "sqlite:///x.db"


def test_run_lands_in_default_sqlite_store(store, monkeypatch):
    import mlflow

    tr = Tracker(None, "exp-a", run_name="smoke", tags={"placement": "split"}, run_dir=store)
    assert tr.uri == f"sqlite:///{store.resolve()}/mlflow.db"
    long = "x" * (MAX_PARAM_VALUE + 1000)
    tr.log_params({"train.lr": 2e-4, "model.fg_labels": [24, 26], "long": long})
    tr.log_metrics({"loss_G": 1.5, "loss_D": 0.25}, step=1)
    tr.log_metrics({"loss_G": 1.0, "loss_D": 0.5}, step=2)
    sample = store / "sample.txt"
    sample.write_text("video stand-in")
    tr.log_artifact(sample, "samples")
    tr.end()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", tr.uri)  # search the store the tracker wrote
    df = mlflow.search_runs(experiment_names=["exp-a"])
    assert len(df) == 1
    row = df.iloc[0]
    assert row["status"] == "FINISHED" and row["tags.placement"] == "split"
    assert row["params.train.lr"] == "0.0002" and row["params.model.fg_labels"] == "[24, 26]"
    assert row["metrics.loss_G"] == 1.0  # the latest value
    hist = tr.client.get_metric_history(tr.run_id, "loss_D")
    assert sorted((m.step, m.value) for m in hist) == [(1, 0.25), (2, 0.5)]
    # Over-long param: truncated to MLflow's limit with a note, full text kept as an artifact.
    logged = row["params.long"]
    assert len(logged) == MAX_PARAM_VALUE and "truncated" in logged
    arts = {a.path for a in tr.client.list_artifacts(tr.run_id, "params")}
    assert arts == {"params/long.txt"}
    assert Path(tr.client.download_artifacts(tr.run_id, "params/long.txt", str(store / "dl"))).read_text() == long
    assert (store / "mlartifacts").is_dir()  # artifacts beside the database, not in the CWD
    assert {a.path for a in tr.client.list_artifacts(tr.run_id, "samples")} == {"samples/sample.txt"}
    assert not (store / OFFLINE_FILE).exists()

    # Resume the same run (a restarted job) and keep logging into it.
    again = Tracker(None, "exp-a", run_id=tr.run_id, run_dir=store)
    again.log_metrics({"loss_G": 0.5}, step=3)
    assert [m.step for m in again.client.get_metric_history(tr.run_id, "loss_G")] == [1, 2, 3]
    # A param changed on resume is refused by MLflow: warned about, kept aside, never raised, and
    # not queued for replay (it would fail again and block the backlog behind it).
    with pytest.warns(RuntimeWarning, match="log params failed"):
        again.log_params({"train.lr": 1.0})
    again.end()
    assert not again.offline and not (store / OFFLINE_FILE).exists()
    assert json.loads((store / REJECTED_FILE).read_text())["values"] == {"train.lr": "1.0"}
    assert again.client.get_run(tr.run_id).info.status == "FINISHED"


def test_dead_server_warns_once_and_keeps_metrics_locally(tmp_path, store):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tr = Tracker(dead_uri(), "exp-b", run_name="offline", run_dir=tmp_path)
        tr.log_params({"train.lr": 2e-4})
        for step in range(1, 4):
            tr.log_metrics({"loss_G": float(step)}, step=step)
        tr.end()
    assert tr.offline and tr.run_id is None
    offline = [w for w in caught if "unreachable" in str(w.message)]
    assert len(offline) == 1, [str(w.message) for w in caught]
    records = [json.loads(line) for line in (tmp_path / OFFLINE_FILE).read_text().splitlines()]
    assert [r["kind"] for r in records] == ["start", "params", "metrics", "metrics", "metrics", "end"]
    assert [(r["step"], r["values"]["loss_G"]) for r in records if r["kind"] == "metrics"] == \
        [(1, 1.0), (2, 2.0), (3, 3.0)]

    # The server is back (here: the SQLite store): the backlog replays into a new run, once.
    from mlflow.tracking import MlflowClient

    tr.uri = f"sqlite:///{store.resolve()}/mlflow.db"
    tr.client = MlflowClient(tracking_uri=tr.uri)
    assert tr.replay() == len(records)
    assert not tr.offline and not (tmp_path / OFFLINE_FILE).exists()
    run = tr.client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.0002"}
    assert sorted((m.step, m.value) for m in tr.client.get_metric_history(tr.run_id, "loss_G")) == \
        [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert tr.replay() == 0


def test_connection_error_classification():
    import requests

    try:
        try:
            raise requests.exceptions.ConnectionError("refused")
        except Exception as e:
            raise RuntimeError("wrapped") from e
    except RuntimeError as wrapped:
        assert is_connection_error(wrapped)
    assert is_connection_error(Exception("API request to http://h/api failed with exception boom"))
    assert not is_connection_error(ValueError("INVALID_PARAMETER_VALUE: changing param values"))


def test_offline_tracker_reconnects_by_itself(tmp_path, store):
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Tracker(dead_uri(), "exp-c", run_dir=tmp_path, retry_after_s=0.0)  # probe on every call
        tr.log_metrics({"loss": 1.0}, step=1)
    assert tr.offline
    tr.uri = f"sqlite:///{store.resolve()}/mlflow.db"
    tr.client = MlflowClient(tracking_uri=tr.uri)
    tr.log_metrics({"loss": 2.0}, step=2)  # the server answers: backlog first, then this record
    assert not tr.offline and not (tmp_path / OFFLINE_FILE).exists()
    hist = tr.client.get_metric_history(tr.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 2.0)]
