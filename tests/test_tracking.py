"""MLflow tracking: runs land in a SQLite store; a dead server costs a warning, never the run; records kept
offline go to their own run, once (the Ray Train and sweep paths under an outage: test_tracking_outage.py)."""

from __future__ import annotations

import json
import socket
import warnings
from pathlib import Path

import pytest

from vid2vid.checkpoints import RUN_ID_FILE
from vid2vid.platform.tracking import (
    MAX_PARAM_VALUE,
    REJECTED_FILE,
    TRACKING_DIR,
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
    assert not (store / TRACKING_DIR).exists()  # online all along: no journal

    # Resume the same run (a restarted job) and keep logging into it.
    again = Tracker(None, "exp-a", run_id=tr.run_id, run_dir=store)
    again.log_metrics({"loss_G": 0.5}, step=3)
    assert [m.step for m in again.client.get_metric_history(tr.run_id, "loss_G")] == [1, 2, 3]
    # A param changed on resume is refused by MLflow: warned about, kept aside, never raised, and
    # not queued for replay (it would fail again and block the backlog behind it).
    with pytest.warns(RuntimeWarning, match="log params failed"):
        again.log_params({"train.lr": 1.0})
    again.end()
    assert not again.offline and again.pending() == 0
    rejected = json.loads((again.journal.dir / REJECTED_FILE).read_text())
    assert rejected["values"] == {"train.lr": "1.0"} and "Changing param values" in rejected["rejected"]
    assert again.client.get_run(tr.run_id).info.status == "FINISHED"


def test_dead_server_warns_once_and_keeps_records_in_the_run_journal(tmp_path, store):
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
    assert "vid2vid sync-tracking" in str(offline[0].message)
    files = list((tmp_path / TRACKING_DIR).rglob("*.jsonl"))
    assert len(files) == 1 and files[0].parent == tr.journal.dir  # its own file in its own run's folder
    records = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert [r["kind"] for r in records] == ["writer", "start", "params", "metrics", "metrics", "metrics", "end"]
    assert records[0]["run_name"] == "offline" and records[0]["experiment"] == "exp-b"
    assert [(r["step"], r["values"]["loss_G"]) for r in records if r["kind"] == "metrics"] == \
        [(1, 1.0), (2, 2.0), (3, 3.0)]
    assert tr.pending() == 6

    # The server is back (here: the SQLite store): the backlog replays into a new run, once.
    from mlflow.tracking import MlflowClient

    tr.uri = f"sqlite:///{store.resolve()}/mlflow.db"
    tr.client = MlflowClient(tracking_uri=tr.uri)
    assert tr.replay() == 6
    assert not tr.offline and tr.pending() == 0
    run = tr.client.get_run(tr.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"train.lr": "0.0002"}
    assert run.info.run_name == "offline"
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
        tr = Tracker(dead_uri(), "exp-c", run_dir=tmp_path, retry_after_s=0.05)  # probe every 50 ms
        tr.log_metrics({"loss": 1.0}, step=1)
    assert tr.offline
    tr.uri = f"sqlite:///{store.resolve()}/mlflow.db"
    tr.client = MlflowClient(tracking_uri=tr.uri)
    assert tr._back.wait(60), "the background probe never saw the server answer"
    tr.log_metrics({"loss": 2.0}, step=2)  # the server answers: backlog first, then this record
    assert not tr.offline and tr.pending() == 0
    hist = tr.client.get_metric_history(tr.run_id, "loss")
    assert sorted((m.step, m.value) for m in hist) == [(1, 1.0), (2, 2.0)]


def _offline_sweep(run_dir: Path, uri: str) -> dict[str, Tracker]:
    """A parent and two runs, each with a driver and a rank-0 writer, all while the server is down."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        parent = Tracker(uri, "exp-d", run_name="sw", run_dir=run_dir, key="sweep:sw", writer="sweep",
                         tags={"sweep/role": "parent"})
        parent.log_params({"sweep.seeds": "[0]"})
        runs = {}
        for name, lr, steps in (("sw-a", 1.0, 3), ("sw-b", 2.0, 2)):
            driver = Tracker(uri, "exp-d", run_name=name, run_dir=run_dir, key=name, writer="driver",
                             parent_key="sweep:sw", tags={"trial": name},
                             run_id_file=run_dir / "ray" / name / RUN_ID_FILE)
            driver.log_params({"train.lr": lr})
            worker = Tracker.join(driver.identity(), writer="rank0")
            for step in range(1, steps + 1):
                worker.log_metrics({"loss": lr * step}, step=step)
            worker.end()
            driver.set_tags({"checkpoint": f"/ckpt/{name}"})
            runs[name] = driver
        parent.end()
    return {"parent": parent, **runs}


def _state(client, exp_name: str) -> dict[str, tuple]:
    """Every run of the experiment: name -> (status, params, loss history, tags we set)."""
    exp = client.get_experiment_by_name(exp_name)
    out = {}
    for r in client.search_runs([exp.experiment_id]):
        hist = sorted((m.step, m.value, m.timestamp) for m in client.get_metric_history(r.info.run_id, "loss"))
        tags = {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.") or k == "mlflow.parentRunId"}
        out[r.info.run_name] = (r.info.run_id, r.info.status, r.data.params, hist, tags)
    return out


def test_runs_sharing_a_run_dir_offline_each_get_only_their_own_records(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from vid2vid.platform.sync_tracking import main as sync

    trackers = _offline_sweep(tmp_path, dead_uri())
    # one folder per run, one file per writer: no file is shared by two runs or two writers
    folders = {p.parent.name: sorted(f.name.split("-")[-1] for f in p.parent.glob("*.jsonl"))
               for p in (tmp_path / TRACKING_DIR).glob("*/journal.json")}
    assert folders == {"sweep%3Asw": ["sweep.jsonl"], "sw-a": ["driver.jsonl", "rank0.jsonl"],
                       "sw-b": ["driver.jsonl", "rank0.jsonl"]}

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    assert sync([f"run_dir={tmp_path}", f"tracking_uri={uri}"]) == 0
    assert "0 pending" in capsys.readouterr().out
    client = MlflowClient(tracking_uri=uri)
    state = _state(client, "exp-d")
    assert set(state) == {"sw", "sw-a", "sw-b"}
    parent_id = state["sw"][0]
    assert state["sw"][1:3] == ("FINISHED", {"sweep.seeds": "[0]"})
    for name, lr, steps in (("sw-a", 1.0, 3), ("sw-b", 2.0, 2)):
        run_id, status, params, hist, tags = state[name]
        assert status == "FINISHED" and params == {"train.lr": str(lr)}
        assert [(s, v) for s, v, _ in hist] == [(s, lr * s) for s in range(1, steps + 1)]  # its own, once
        assert tags["trial"] == name and tags["checkpoint"] == f"/ckpt/{name}"
        assert tags["mlflow.parentRunId"] == parent_id  # created after its parent, nested under it
        assert (tmp_path / "ray" / name / RUN_ID_FILE).read_text() == run_id  # where the trainer looks
    assert all(t.pending() == 0 for t in trackers.values())

    # Again: nothing to push, nothing added.
    assert sync([f"run_dir={tmp_path}", f"tracking_uri={uri}"]) == 0
    assert "0 records pushed" in capsys.readouterr().out
    assert _state(client, "exp-d") == state

    # A crash after MLflow took the records but before the cursors and the binding were written:
    # the replay runs again from the start, finds the run by its journal tag and adds nothing.
    for name in ("sw-a", "sw-b"):
        folder = tmp_path / TRACKING_DIR / name
        for cursor in folder.glob("*.pushed"):
            cursor.unlink()
        (folder / "run_id").unlink()
    assert sync([f"run_dir={tmp_path}", f"tracking_uri={uri}"]) == 0
    assert "0 pending" in capsys.readouterr().out
    assert _state(client, "exp-d") == state


def test_a_half_written_record_waits_until_its_line_is_complete(tmp_path, store):
    from mlflow.tracking import MlflowClient

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = Tracker(dead_uri(), "exp-e", run_dir=tmp_path, key="half")
        tr.log_metrics({"loss": 1.0}, step=1)
    line = json.dumps({"t": 1, "run_id": None, "kind": "metrics", "step": 2, "timestamp": 2, "values": {"loss": 2.0}})
    with tr._writer.path.open("a") as f:
        f.write(line[:20])  # a writer caught mid-line
    tr.client = MlflowClient(tracking_uri=f"sqlite:///{store.resolve()}/mlflow.db")
    tr.replay()
    assert [m.step for m in tr.client.get_metric_history(tr.run_id, "loss")] == [1]
    with tr._writer.path.open("a") as f:
        f.write(line[20:] + "\n")
    assert tr.pending() == 1
    tr.replay()
    assert sorted(m.step for m in tr.client.get_metric_history(tr.run_id, "loss")) == [1, 2]
