"""MLflow tracking that never kills training and never mixes runs.

A :class:`Tracker` owns one MLflow run through an explicit ``MlflowClient`` (no fluent global "active
run": that state is per thread and collides with Ray Tune's own MLflow integration).

When the tracking server does not answer, the first failure warns once, the tracker goes offline and
every record (metrics, params, tags, artifact paths, start and end) goes to the run's journal
(:mod:`vid2vid.platform.journal`: one folder per run key, one file per writer). A background thread
asks the server every ``retry_after_s`` seconds whether it answers again; the next record then
replays the run's backlog (every writer's) before it is sent. :meth:`Tracker.replay` does the same on
demand (the trainer calls it after ``fit``), :func:`replay_journal` without a tracker (``vid2vid
sync-tracking``). Replay is idempotent, so a crash midway neither loses nor duplicates a record:
cursors move only after MLflow took a record, MLflow's SQL stores drop a metric identical to one they
have (same key, step, value and timestamp, which the journal keeps), params and tags are rewritten
with the same values, a status applies only if newer than the run's last, and a run is created at
most once per key (found again by its ``vid2vid.journal`` tag). Any other MLflow error (e.g. a
resumed run given a different value for a param) warns once per kind and the record goes to the
run's ``rejected.jsonl`` (never retried, so it cannot block the backlog): tracking problems cost a
log line, never a training run.
"""

from __future__ import annotations

import heapq
import os
import socket
import threading
import uuid
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vid2vid.platform.journal import REJECTED_FILE, TRACKING_DIR, PendingFile, RunJournal, now_ms

# Keep a dead server cheap: no urllib3 retries with backoff (the default retries for minutes) and a
# short socket timeout. setdefault: a user's explicit settings win. Read by MLflow per request.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation)
MAX_BATCH_PARAMS = 100
MAX_BATCH_METRICS = 1000
TRUNCATION_NOTE = "... [truncated, full value in artifact params/{key}.txt]"
JOURNAL_TAG = "vid2vid.journal"  # on runs created for a journal key: finds the run again after a crash
TERMINAL = {"FINISHED", "FAILED", "KILLED"}

RUN_ID_FILE = "mlflow_run_id.txt"  # the trainer keeps a run's MLflow run id beside its checkpoints

__all__ = ["MAX_PARAM_VALUE", "REJECTED_FILE", "RUN_ID_FILE", "TRACKING_DIR", "ReplayReport", "Tracker",
           "is_connection_error", "read_run_id", "replay_journal", "resolve_tracking_uri"]


def read_run_id(run_folder: str | Path) -> str | None:
    """The MLflow run id kept in ``<run_dir>/ray/<run_name>/mlflow_run_id.txt``, None when absent or empty."""
    path = Path(run_folder) / RUN_ID_FILE
    return (path.read_text().strip() or None) if path.is_file() else None


def resolve_tracking_uri(tracking_uri: str | None, run_dir: str | Path) -> str:
    """Explicit URI (the config) > ``MLFLOW_TRACKING_URI`` > ``sqlite:///<run_dir>/mlflow.db``."""
    if tracking_uri:
        return tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` means "the server did not answer" (MLflow wraps these in MlflowException)."""
    import requests

    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                            ConnectionError, TimeoutError)):
            return True
        msg = str(exc)
        if msg.startswith("API request to") and ("failed with" in msg or "Max retries" in msg):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class JournalBusy(Exception):
    """Another process holds the run's journal lock (it is replaying): keep the record for later."""


# ------------------------------------------------------------------------------------------------
# Sending one record (live and in replay alike)


def _param_value(key: str, value: Any) -> tuple[str, str | None]:
    """MLflow-sized param text, plus the full text when it had to be truncated."""
    text = "None" if value is None else str(value)
    if len(text) <= MAX_PARAM_VALUE:
        return text, None
    note = TRUNCATION_NOTE.format(key=key)
    return text[: MAX_PARAM_VALUE - len(note)] + note, text


def push_metrics(client, run_id: str, records: list[dict[str, Any]]) -> None:
    from mlflow.entities import Metric

    ms = [Metric(k, v, r["timestamp"], r["step"]) for r in records for k, v in r["values"].items()]
    for i in range(0, len(ms), MAX_BATCH_METRICS):
        client.log_batch(run_id, metrics=ms[i : i + MAX_BATCH_METRICS])


def push_record(client, run_id: str, rec: dict[str, Any]) -> None:
    """Send one journal record to run ``run_id``; raises on any failure. Safe to repeat."""
    from mlflow.entities import Param, RunTag

    kind = rec["kind"]
    if kind == "metrics":
        push_metrics(client, run_id, [rec])
    elif kind == "params":
        items, full = [], {}
        for k, v in rec["values"].items():
            text, whole = _param_value(k, v)
            items.append(Param(k, text))
            if whole is not None:
                full[k] = whole
        for i in range(0, len(items), MAX_BATCH_PARAMS):
            client.log_batch(run_id, params=items[i : i + MAX_BATCH_PARAMS])
        for k, text in full.items():
            client.log_text(run_id, text, f"params/{k}.txt")
    elif kind in ("tags", "start"):
        tags = [RunTag(k, str(v)) for k, v in (rec.get("values") or rec.get("tags") or {}).items()]
        for i in range(0, len(tags), MAX_BATCH_PARAMS):
            client.log_batch(run_id, tags=tags[i : i + MAX_BATCH_PARAMS])
        if kind == "start" and rec.get("status"):
            _apply_status(client, run_id, rec["status"], rec["t"])
    elif kind == "artifact":
        client.log_artifact(run_id, rec["path"], rec.get("artifact_path"))
    elif kind == "end":
        _apply_status(client, run_id, rec["status"], rec["t"])
    else:
        raise ValueError(f"unknown tracking record kind {kind!r}: {str(rec)[:200]}")


def _apply_status(client, run_id: str, status: str, t: int) -> None:
    """Set the run's status as of time ``t``, unless a later end (the run's end_time) already says more."""
    info = client.get_run(run_id).info
    if info.end_time is not None and info.end_time > t:
        return  # a record replayed late must not undo a newer end
    if status in TERMINAL:
        client.set_terminated(run_id, status, end_time=t)
    else:
        client.update_run(run_id, status=status)


def create_run(client, header: Mapping[str, Any], journal_id: str | None, parent_run_id: str | None) -> str:
    """Create the MLflow run a writer header describes (experiment, name, tags, start time)."""
    tags = {k: str(v) for k, v in (header.get("tags") or {}).items()}
    if journal_id:
        tags[JOURNAL_TAG] = journal_id
    if parent_run_id and "mlflow.parentRunId" not in tags:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(_experiment_id(client, header["experiment"], header.get("uri", "")),
                            run_name=header.get("run_name"), tags=tags, start_time=header.get("t"))
    return run.info.run_id


def _experiment_id(client, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the CWD
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts)
    except Exception as exc:  # noqa: BLE001 - another process created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise exc from None
        return exp.experiment_id


def bind_run(journal: RunJournal, header: Mapping[str, Any], client,
             client_for: Callable[[str | None], Any]) -> tuple[str, bool]:
    """The run of ``journal``'s key, created once: (run id, created now). Call with the journal's lock held."""
    bound = journal.bound_run_id()
    if bound:
        return bound, False
    created = False
    exp = client.get_experiment_by_name(header["experiment"])
    found = client.search_runs([exp.experiment_id], f"tags.`{JOURNAL_TAG}` = '{journal.id}'") if exp else []
    if found:  # created before a crash that came before the binding was written
        run_id = found[0].info.run_id
    else:
        parent = _parent_run_id(journal, header.get("parent_key"), client_for)
        run_id, created = create_run(client, header, journal.id, parent), True
    journal.bind(run_id, header.get("run_id_file"))
    return run_id, created


def _parent_run_id(journal: RunJournal, parent_key: str | None, client_for) -> str | None:
    """The parent run's id from its journal, replaying the parent first when it is pending."""
    if not parent_key or parent_key == journal.key:
        return None
    parent = RunJournal(journal.root, parent_key)
    if parent.bound_run_id() is None and parent.dir.is_dir():
        replay_journal(parent, client_for, wait=False)
    return parent.bound_run_id()


# ------------------------------------------------------------------------------------------------
# Replaying a journal


@dataclass
class ReplayReport:
    key: str
    run_id: str | None = None
    pushed: int = 0
    rejected: int = 0
    pending: int = 0  # still waiting when the replay stopped
    busy: bool = False  # another process was replaying this run
    error: str | None = None  # why it stopped early (the server did not answer)


def replay_journal(journal: RunJournal, client_for: Callable[[str | None], Any], wait: bool = True) -> ReplayReport:
    """Push every pending record of ``journal`` into its MLflow run, in time order across its writers.

    ``client_for(uri)`` gives the client of a writer's tracking URI. Stops at the first record the
    server does not answer for (the rest stay pending); records MLflow refuses go to the rejected
    file. Returns at once with ``busy`` when ``wait`` is false and another process is replaying.
    """
    report = ReplayReport(journal.key, run_id=journal.bound_run_id())
    with journal.locked(wait) as held:
        if not held:
            report.busy, report.pending = True, journal.pending_count()
            return report
        files = journal.pending()
        items = list(heapq.merge(*[[(rec.get("t", 0), i, off, rec) for off, rec in pf.records]
                                   for i, pf in enumerate(files)], key=lambda x: x[:3]))
        pos = 0
        while pos < len(items):
            taken, error = _replay_some(journal, files, items, pos, client_for, report)
            if error is not None:
                report.error = error
                break
            pos += taken
        report.run_id = journal.bound_run_id() or report.run_id
        report.pending = journal.pending_count()
    return report


def _replay_some(journal: RunJournal, files: list[PendingFile], items: list, pos: int, client_for,
                 report: ReplayReport) -> tuple[int, str | None]:
    """Push ``items[pos]`` (and the metrics records right after it that go to the same run, in one batch)."""
    _, fi, _, rec = items[pos]
    header = files[fi].header
    client = client_for(header.get("uri"))
    if rec.get("kind") == "unreadable":  # a corrupt line: kept aside, never blocks the rest
        journal.reject(rec, "not a JSON record")
        report.rejected += 1
        journal.advance(files[fi].path, items[pos][2])
        return 1, None
    try:
        run_id = rec.get("run_id") or bind_run(journal, header, client, client_for)[0]
    except Exception as exc:  # noqa: BLE001
        return _failure(journal, rec, exc, report, files[fi], items[pos][2])
    batch = [items[pos]]
    if rec["kind"] == "metrics":
        size = len(rec["values"])
        for item in items[pos + 1:]:
            r = item[3]
            if (r.get("kind") != "metrics" or (r.get("run_id") or run_id) != run_id
                    or files[item[1]].header.get("uri") != header.get("uri")
                    or size + len(r["values"]) > MAX_BATCH_METRICS):
                break
            batch.append(item)
            size += len(r["values"])
    try:
        if rec["kind"] == "metrics":
            push_metrics(client, run_id, [item[3] for item in batch])
        else:
            push_record(client, run_id, rec)
    except Exception as exc:  # noqa: BLE001 - classified below
        if len(batch) > 1 and not is_connection_error(exc):  # find the record MLflow refuses: one at a time
            return _replay_single(journal, files, batch[0], client, run_id, report)
        return _failure(journal, rec, exc, report, files[fi], items[pos][2])
    for item in batch:
        journal.advance(files[item[1]].path, item[2])
    report.pushed += len(batch)
    report.run_id = run_id
    return len(batch), None


def _replay_single(journal, files, item, client, run_id, report) -> tuple[int, str | None]:
    _, fi, off, rec = item
    try:
        push_record(client, run_id, rec)
    except Exception as exc:  # noqa: BLE001
        return _failure(journal, rec, exc, report, files[fi], off)
    journal.advance(files[fi].path, off)
    report.pushed += 1
    return 1, None


def _failure(journal: RunJournal, rec: dict, exc: Exception, report: ReplayReport, pf: PendingFile,
             offset: int) -> tuple[int, str | None]:
    """A connection error stops the replay: (0, why). Anything else rejects the record and goes on: (1, None)."""
    if is_connection_error(exc):
        return 0, f"{type(exc).__name__}: {str(exc)[:200]}"
    journal.reject(rec, f"{type(exc).__name__}: {exc}")
    journal.advance(pf.path, offset)
    report.rejected += 1
    return 1, None


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

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_tracking_uri(tracking_uri, run_dir)
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
                "tags": self.tags, "key": self.key, "run_dir": str(self.run_dir.resolve()),
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
                              f"`vid2vid sync-tracking run_dir={self.run_dir}`); training goes on")
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
