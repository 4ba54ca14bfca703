"""MLflow tracking that never kills training and never mixes runs.

A :class:`Tracker` owns one MLflow run through an explicit ``MlflowClient`` (no fluent global "active
run": that state is per thread and collides with Ray Tune's own MLflow integration).

When the tracking server does not answer, the first failure warns once, the tracker goes offline and
every record (metrics, params, tags, artifact paths, start and end) goes to the run's journal
(:mod:`vid2vid.platform.journal`: one folder per run key, one file per writer). A background thread
asks the server every ``retry_after_s`` seconds whether it answers again; the next record then
replays the run's backlog (every writer's) before it is sent. :meth:`Tracker.replay` does the same on
demand (the trainer calls it after ``fit``), :func:`replay_journal` without a tracker (``vid2vid
sync-tracking``); replay is idempotent (:mod:`vid2vid.platform.mlflow_records`), so a crash midway
neither loses nor duplicates a record. Any other MLflow error (e.g. a resumed run given a different
value for a param) warns once per kind and the record goes to the run's ``rejected.jsonl`` (never
retried, so it cannot block the backlog): tracking problems cost a log line, never a training run.
"""

from __future__ import annotations

import os
import socket
import threading
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vid2vid import storage
from vid2vid.platform.journal import REJECTED_FILE, TRACKING_DIR, RunJournal, now_ms
from vid2vid.platform.mlflow_records import (
    MAX_PARAM_VALUE,
    ReplayReport,
    bind_run,
    create_run,
    is_connection_error,
    push_record,
    replay_journal,
)

__all__ = ["MAX_PARAM_VALUE", "REJECTED_FILE", "TRACKING_DIR", "ReplayReport", "Tracker",
           "is_connection_error", "replay_journal", "resolve_tracking_uri"]


def resolve_tracking_uri(tracking_uri: str | None, run_dir: str | Path) -> str:
    """Explicit URI (the config) > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<run_dir>/mlflow.db``; the last
    only for a local run_dir (SQLite needs a local file, and a run's processes on other nodes would each
    write their own)."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if storage.is_remote(run_dir):
        raise storage.StorageError(f"train.run_dir={run_dir} is not a local folder, so MLflow's default SQLite "
                                   f"store cannot live in it: give an MLflow server (train.tracking_uri=http://"
                                   f"HOST:5000 or MLFLOW_TRACKING_URI)")
    return f"sqlite:///{storage.local_dir(run_dir) / 'mlflow.db'}"


class JournalBusy(Exception):
    """Another process holds the run's journal lock (it is replaying): keep the record for later."""


# ------------------------------------------------------------------------------------------------
# The tracker a run logs through


def default_key(run_name: str | None, run_id: str | None) -> str:
    """A tracker without an explicit key: its run id, else a key of its own (shared with no one)."""
    return f"id:{run_id}" if run_id else f"{run_name or 'run'}:{uuid.uuid4().hex[:12]}"


class Tracker:
    """One MLflow run. ``key`` (optional) is the run's identity across processes: trackers with the
    same key and ``run_dir`` (the driver, rank 0, a sweep trial) share one run, created once, even when
    the server was down while they ran; without a key the tracker's run is its own. ``parent_key``
    names the parent run's key (nests a run created offline under it); ``run_id_file`` gets the run
    id once it is known (e.g. the trainer's ``mlflow_run_id.txt``)."""

    resume_status: str | None = "RUNNING"  # what a start sets on an existing run; None: leave it

    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None = None,
                 run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 run_dir: str | Path = "runs", retry_after_s: float = 30.0, *, key: str | None = None,
                 writer: str = "main", parent_key: str | None = None, run_id_file: str | Path | None = None):
        from mlflow.tracking import MlflowClient

        self.uri = resolve_tracking_uri(tracking_uri, run_dir)
        # The journal needs flock(2): it lives in run_dir when that is a local folder, else in the node's
        # local stand-in for it (storage.local_dir: ~/.cache/vid2vid/runs/<URI>).
        self.run_location = storage.normalize(run_dir)
        self.run_dir = storage.local_dir(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.experiment, self.run_name, self.run_id = experiment, run_name, run_id
        self.tags = _jsonable(tags or {})
        self.keyed = key is not None
        self.key = key or default_key(run_name, run_id)
        self.parent_key, self.run_id_file = parent_key, (str(run_id_file) if run_id_file else None)
        self.journal = RunJournal(self.run_dir / TRACKING_DIR, self.key)
        self.retry_after_s = retry_after_s
        self.offline = False
        self.client = MlflowClient(tracking_uri=self.uri)
        self._warned: set[str] = set()
        self._back, self._stop = threading.Event(), threading.Event()  # server answers again / stop probing
        self._prober: threading.Thread | None = None
        self._writer = self.journal.writer({**self.identity(), "writer": writer, "pid": os.getpid(),
                                            "host": socket.gethostname(), "t": now_ms()})
        if self.keyed:
            self._adopt_binding()
        if self.journal.dir.is_dir() and self.journal.pending():
            self.replay()  # records an earlier process kept (e.g. the driver's while the server was down)
        self._emit({"kind": "start", "tags": self.tags, "status": self.resume_status})

    @classmethod
    def join(cls, identity: Mapping[str, Any], writer: str) -> Tracker:
        """Another process's tracker of the same run (``identity()`` of the first), e.g. rank 0's."""
        i = dict(identity)
        return cls(i["uri"], i["experiment"], run_name=i.get("run_name"), run_id=i.get("run_id"),
                   tags=i.get("tags"), run_dir=i["run_dir"], key=i["key"], writer=writer,
                   parent_key=i.get("parent_key"), run_id_file=i.get("run_id_file"))

    def identity(self) -> dict[str, Any]:
        """What another process needs to log into this run (JSON-able)."""
        return {"uri": self.uri, "experiment": self.experiment, "run_name": self.run_name, "run_id": self.run_id,
                "tags": self.tags, "key": self.key, "run_dir": self.run_location,
                "parent_key": self.parent_key, "run_id_file": self.run_id_file}

    # -- public API: each call builds one record and emits it -----------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a flat ``key -> value`` dict; values over MLflow's 6000 chars are truncated with a
        note and logged in full as the text artifact ``params/<key>.txt``."""
        values = {k: (None if v is None else str(v)) for k, v in params.items()}
        self._emit({"kind": "params", "values": values})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}  # tensors and numpy scalars too
        self._emit({"kind": "metrics", "step": int(step), "timestamp": now_ms(), "values": values})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            self._warn(f"missing:{path}", f"artifact {path} does not exist; not logged")
            return
        self._emit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit({"kind": "tags", "values": _jsonable(tags)})

    def end(self, status: str = "FINISHED") -> None:
        self._emit({"kind": "end", "status": status})
        self.close()

    def close(self) -> None:
        """Stop probing the server (records still go to the journal): the job's end-of-run replay or
        ``vid2vid sync-tracking`` take over from here."""
        self._stop.set()

    def replay(self, wait: bool = False) -> int:
        """Push the run's backlog (every writer's) to this tracker's server now; returns how many
        records were handled (sent or rejected). Raises nothing. ``wait``: wait for another process
        replaying the same run instead of leaving it to that one."""
        report = replay_journal(self.journal, lambda _uri: self.client, wait=wait)
        self.run_id = self.run_id or report.run_id
        if report.error is not None:
            self._go_offline(report.error)
        elif report.busy:
            self.offline = True
            self._back.set()  # try again with the next record
        else:
            self.offline = False
        return report.pushed + report.rejected

    def pending(self) -> int:
        """Records of this run (any writer) not yet in MLflow."""
        return self.journal.pending_count()

    # -- plumbing ------------------------------------------------------------------------------
    def _emit(self, rec: dict[str, Any]) -> None:
        rec = self._writer.stamp({"run_id": self.run_id, **rec})
        if self.offline and not self._reconnect():
            self._writer.append(rec)
            return
        outcome, why = self._call(f"log {rec['kind']}", lambda: self._push(rec))
        if outcome in ("offline", "busy"):
            self._writer.append({**rec, "run_id": self.run_id})
        elif outcome == "rejected":
            self.journal.reject(rec, why)

    def _push(self, rec: dict[str, Any]) -> None:
        """Send one record to MLflow now; raises on any failure."""
        if rec["kind"] == "start":
            self._start_run(rec["tags"])
            return
        if self.run_id is None:  # the run could not be created earlier: create it first
            self._start_run({})
        push_record(self.client, self.run_id, rec)

    def _start_run(self, tags: Mapping[str, Any]) -> None:
        """Create the run (once per key) or, for an existing one, set its tags and ``resume_status``."""
        if self.run_id is None and self._create_or_find():
            return  # created just now, with these tags, RUNNING
        push_record(self.client, self.run_id, {"kind": "start", "tags": dict(tags), "status": self.resume_status,
                                               "t": now_ms()})

    def _create_or_find(self) -> bool:
        """Give this tracker its run id; True when the run was created just now."""
        header = self._writer.header
        if not self.keyed:
            self.run_id = create_run(self.client, header, None, None)
            return True
        with self.journal.locked(wait=False) as held:
            if not held:
                raise JournalBusy(self.journal.dir)
            self.run_id, created = bind_run(self.journal, header, self.client, lambda _uri: self.client)
        return created

    def _adopt_binding(self) -> None:
        bound = self.journal.bound_run_id() if self.journal.dir.is_dir() else None
        if self.run_id is None:
            self.run_id = bound
        elif bound is None:
            self.journal.bind(self.run_id, self.run_id_file)
        elif bound != self.run_id:
            self._warn("binding", f"{self.journal.dir} belongs to MLflow run {bound}, this tracker was given "
                                  f"{self.run_id}; its records go to {self.run_id}")

    def _reconnect(self) -> bool:
        """When the probe says the server answers again: replay the backlog; True when back online."""
        if not self._back.is_set():
            return False
        self._back.clear()
        self.replay()
        return not self.offline

    def _call(self, what: str, fn) -> tuple[str, str]:
        """Run ``fn``: ("ok" | "offline" (the server did not answer) | "busy" (another process is
        replaying this run) | "rejected" (the server said no), why)."""
        try:
            fn()
            return "ok", ""
        except JournalBusy:
            self.offline = True
            self._back.set()
            return "busy", "another process is replaying this run"
        except Exception as exc:  # noqa: BLE001 - tracking must never raise into training
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
            if is_connection_error(exc):
                self._go_offline(why)
                return "offline", why
            self._warn(what, f"MLflow {what} failed ({why}); record kept in {self.journal.dir / REJECTED_FILE}, "
                             f"training goes on")
            return "rejected", why

    def _go_offline(self, why: str) -> None:
        self.offline = True
        self._warn("offline", f"MLflow at {self.uri} is unreachable ({why}); run {self.key!r} keeps its records "
                              f"in {self.journal.dir} and sends them when the server answers again (or run "
                              f"`vid2vid sync-tracking run_dir={self.run_location}`); training goes on")
        if not self._stop.is_set() and (self._prober is None or not self._prober.is_alive()):
            self._prober = threading.Thread(target=self._probe, name=f"mlflow-probe:{self.key}", daemon=True)
            self._prober.start()

    def _probe(self) -> None:
        """Background: ask the server every ``retry_after_s`` whether it answers; never blocks training."""
        while not self._stop.wait(max(self.retry_after_s, 0.05)):
            try:
                self.client.search_experiments(max_results=1)
            except Exception as exc:  # noqa: BLE001
                if is_connection_error(exc):
                    continue
            self._back.set()
            return

    def _warn(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}


class CommittedMetrics:
    """Per-step metrics reach MLflow only once a checkpoint covering them is committed.

    A worker that dies redoes the steps after its last committed checkpoint; holding their metrics
    until the next commit means MLflow never shows a step twice (nor a step the model lost).
    """

    def __init__(self, tracker: Any):
        self.tracker = tracker
        self.pending: list[tuple[int, dict[str, float]]] = []

    def buffer(self, metrics: dict[str, float], step: int, committed: bool) -> None:
        self.pending.append((step, metrics))
        if committed:
            self.commit()

    def commit(self) -> None:
        """After a checkpoint was reported: wait until Ray Train has committed it, then log."""
        import ray.train

        ray.train.get_all_reported_checkpoints(consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED)
        self.flush()

    def flush(self) -> None:
        for step, metrics in self.pending:
            self.tracker.log_metrics(metrics, step=step)
        self.pending.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tracker, name)
