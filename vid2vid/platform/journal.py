"""The offline tracking journal: what a :class:`~vid2vid.platform.tracking.Tracker` could not send to MLflow.

One folder per run, one append-only file per writer (a Tracker instance: the driver, rank 0, a sweep
trial, an evaluator), so runs never share a file and no file is ever rewritten while another
process appends to it::

    <run_dir>/tracking/<run key, %-quoted>/
        journal.json           {"key": ..., "id": ...}: the id tags the MLflow run created for this key
        run_id                 the MLflow run id, once known (the "binding")
        lock                   flock(2) target: one replayer at a time per run
        <ns>-<pid>-<rand>-<writer>.jsonl   a "writer" header line, then one record per line
        <same>.pushed          byte offset up to which that file is in MLflow (only a lock holder writes it)
        rejected.jsonl         records MLflow refused (never retried)

A run's key is its identity across processes: the trainer uses the run name, a sweep ``sweep:<name>``;
trackers with the same key and run_dir log into one MLflow run, created once. A record is read only
once its line is complete, so a replayer may run while writers append; a writer killed mid-line
leaves a tail that is never read. This module knows files only; pushing to MLflow is ``tracking``'s.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

from vid2vid import storage

TRACKING_DIR = "tracking"
META_FILE = "journal.json"
BINDING_FILE = "run_id"
LOCK_FILE = "lock"
REJECTED_FILE = "rejected.jsonl"
CURSOR_SUFFIX = ".pushed"


def now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class PendingFile:
    """One writer file: its header and the complete records not yet pushed, with their end offsets."""

    path: Path
    header: dict[str, Any]
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (offset after the line, record)


class RunJournal:
    """The journal folder of one run key under ``root`` (= ``<run_dir>/tracking``)."""

    def __init__(self, root: str | Path, key: str):
        self.root, self.key = Path(root), key
        self.dir = self.root / quote(key, safe="")

    @classmethod
    def at(cls, folder: Path) -> RunJournal:
        """The journal of an existing folder (its key from ``journal.json``, else the folder name)."""
        meta = folder / META_FILE
        key = json.loads(meta.read_text())["key"] if meta.is_file() else unquote(folder.name)
        return cls(folder.parent, key)

    # -- identity -------------------------------------------------------------------------------
    def ensure(self) -> str:
        """Create the folder once (safe against a concurrent creator); returns the journal id."""
        meta = self.dir / META_FILE
        if not meta.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{META_FILE}.{uuid.uuid4().hex}"
            tmp.write_text(json.dumps({"key": self.key, "id": uuid.uuid4().hex}))
            with contextlib.suppress(FileExistsError):
                os.link(tmp, meta)  # atomic: the first creator wins, the others read its id
            tmp.unlink()
        return json.loads(meta.read_text())["id"]

    @property
    def id(self) -> str:
        return self.ensure()

    def bound_run_id(self) -> str | None:
        path = self.dir / BINDING_FILE
        return (path.read_text().strip() or None) if path.is_file() else None

    def bind(self, run_id: str, id_file: str | Path | None = None) -> None:
        """Record the run id for this key (and in ``id_file``, e.g. the trainer's mlflow_run_id.txt, which
        may be a URI: beside checkpoints in S3)."""
        self.ensure()
        _write_atomic(self.dir / BINDING_FILE, run_id)
        if id_file and not storage.exists(id_file):
            storage.write_text(id_file, run_id)

    # -- writing ----------------------------------------------------------------------------------
    def writer(self, header: dict[str, Any]) -> JournalWriter:
        return JournalWriter(self, header)

    def reject(self, rec: dict[str, Any], reason: str) -> None:
        self.ensure()
        _append(self.dir / REJECTED_FILE, {**rec, "rejected": reason[:500]})

    # -- replaying --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def locked(self, wait: bool = True) -> Iterator[bool]:
        """Hold the run's lock; yields False (without waiting) when ``wait`` is false and it is taken."""
        self.ensure()
        with open(self.dir / LOCK_FILE, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def files(self) -> list[Path]:
        return sorted(self.dir.glob("*.jsonl")) if self.dir.is_dir() else []

    def pending(self) -> list[PendingFile]:
        """Every writer file with complete records past its cursor, oldest file first."""
        out = []
        for path in self.files():
            if path.name == REJECTED_FILE:
                continue
            pf = _read_pending(path, _cursor(path))
            if pf is not None and pf.records:
                out.append(pf)
        return out

    def pending_count(self) -> int:
        return sum(len(p.records) for p in self.pending())

    @staticmethod
    def advance(path: Path, offset: int) -> None:
        """Mark ``path`` pushed up to byte ``offset`` (only a holder of the run's lock calls this)."""
        _write_atomic(path.with_name(path.name + CURSOR_SUFFIX), str(offset))


class JournalWriter:
    """Appends records of one Tracker to its own file, created on the first record, header first."""

    def __init__(self, journal: RunJournal, header: dict[str, Any]):
        self.journal, self.header = journal, header
        self.path: Path | None = None
        self._last_t = 0

    def stamp(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Give ``rec`` its time ``t`` (ms), never before this writer's previous record."""
        self._last_t = max(self._last_t, now_ms())
        return {"t": self._last_t, **rec}

    def append(self, rec: dict[str, Any]) -> None:
        if self.path is None:
            self.journal.ensure()
            name = "".join(c if c.isalnum() or c in "-_" else "_" for c in self.header.get("writer", "w"))
            self.path = self.journal.dir / f"{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:6]}-{name}.jsonl"
            _append(self.path, {"kind": "writer", **self.header})
        _append(self.path, rec)


def find_journals(run_dir: str | Path) -> list[RunJournal]:
    """Every run journal under ``run_dir`` (also nested ones, e.g. the evaluator's ``<run_dir>/eval``)."""
    return [RunJournal.at(meta.parent) for meta in sorted(Path(run_dir).rglob(META_FILE))
            if meta.parent.parent.name == TRACKING_DIR]


# ------------------------------------------------------------------------------------------------


def _append(path: Path, rec: dict[str, Any]) -> None:
    """One ``write(2)`` of one whole line on an O_APPEND descriptor."""
    data = (json.dumps(rec) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cursor(path: Path) -> int:
    c = path.with_name(path.name + CURSOR_SUFFIX)
    return int(c.read_text() or 0) if c.is_file() else 0


def _read_pending(path: Path, offset: int) -> PendingFile | None:
    with path.open("rb") as f:
        first = f.readline()
        if not first.endswith(b"\n"):
            return None  # the header is still being written
        header = json.loads(first)
        start = max(offset, len(first))
        f.seek(start)
        data = f.read()
    pf = PendingFile(path, header)
    pos = start
    for line in data.split(b"\n")[:-1]:  # the piece after the last newline is incomplete: not yet
        pos += len(line) + 1
        if not line.strip():
            continue
        try:
            pf.records.append((pos, json.loads(line)))
        except json.JSONDecodeError:
            pf.records.append((pos, {"kind": "unreadable", "line": line.decode(errors="replace")}))
    return pf
