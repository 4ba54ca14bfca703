"""Sending tracking records to MLflow: one record live, or a run's whole journal (replay).

Every operation is safe to repeat, which is what makes replay exactly-once across crashes: cursors
move only after MLflow took a record; MLflow's SQL stores drop a metric identical to one they have
(same key, step, value and timestamp, which the journal keeps); params and tags are written again
with the same values; a status applies only if newer than the run's ``end_time``; and a journal's
run is created at most once (found again by its ``vid2vid.journal`` tag if a crash came before its
id was saved).
"""

from __future__ import annotations

import heapq
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vid2vid.platform.journal import PendingFile, RunJournal

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

# MLflow 3's UI opens an experiment by its kind: without this tag it may guess "GenAI" and land on an
# empty traces overview instead of the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


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
        if not any(k in exp.tags for k in EXPERIMENT_KIND):  # made by an older version or by hand
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    artifacts = None
    if uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in the CWD
        artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifacts, tags=EXPERIMENT_KIND)
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
