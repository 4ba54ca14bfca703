"""MLflow tracking that never kills training.

A :class:`Tracker` owns one MLflow run through an explicit ``MlflowClient`` (no fluent global "active
run": that state is per thread and collides with Ray Tune's own MLflow integration).

When the tracking server is down or unreachable, the first failure warns once, the tracker goes
offline and every record (metrics, params, tags, artifact paths) is appended to
``<run_dir>/metrics-offline.jsonl``. It probes the server again every ``retry_after_s`` seconds and,
once it answers, replays the backlog; :meth:`Tracker.replay` does the same on demand. Any other
MLflow error (e.g. a resumed run given a different value for a param) warns once per kind and the
record goes to ``<run_dir>/tracking-rejected.jsonl`` (never retried, so it cannot block the backlog):
tracking problems cost a log line, never a training run.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Keep a dead server cheap: no urllib3 retries with backoff (the default retries for minutes) and a
# short socket timeout. setdefault: a user's explicit settings win. Read by MLflow per request.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")

MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value (mlflow.utils.validation)
MAX_BATCH_PARAMS = 100
MAX_BATCH_METRICS = 1000
OFFLINE_FILE = "metrics-offline.jsonl"  # waiting for the server; replayed in order
REJECTED_FILE = "tracking-rejected.jsonl"  # refused by MLflow (e.g. a changed param); kept, not retried
TRUNCATION_NOTE = "... [truncated, full value in artifact params/{key}.txt]"


# MLflow 3's UI opens an experiment by its kind: without this tag it may guess "GenAI" and land on an
# empty traces overview instead of the runs table.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_ID_FILE = "mlflow_run_id.txt"  # the trainer keeps a run's MLflow run id beside its checkpoints


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


def _param_value(key: str, value: Any) -> tuple[str, str | None]:
    """MLflow-sized param text, plus the full text when it had to be truncated."""
    text = "None" if value is None else str(value)
    if len(text) <= MAX_PARAM_VALUE:
        return text, None
    note = TRUNCATION_NOTE.format(key=key)
    return text[: MAX_PARAM_VALUE - len(note)] + note, text


class Tracker:
    def __init__(self, tracking_uri: str | None, experiment: str, run_name: str | None = None,
                 run_id: str | None = None, tags: Mapping[str, Any] | None = None,
                 run_dir: str | Path = "runs", retry_after_s: float = 300.0):
        from mlflow.tracking import MlflowClient

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.uri = resolve_tracking_uri(tracking_uri, run_dir)
        self.experiment, self.run_name, self.run_id = experiment, run_name, run_id
        self.offline_path = self.run_dir / OFFLINE_FILE
        self.rejected_path = self.run_dir / REJECTED_FILE
        self.retry_after_s = retry_after_s
        self.offline = False
        self._failed_at = 0.0
        self._warned: set[str] = set()
        self.client = MlflowClient(tracking_uri=self.uri)
        self._emit({"kind": "start", "tags": _jsonable(tags or {})})

    # -- public API: each call builds one record and emits it -----------------------------------
    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a flat ``key -> value`` dict; values over MLflow's 6000 chars are truncated with a
        note and logged in full as the text artifact ``params/<key>.txt``."""
        values = {k: (None if v is None else str(v)) for k, v in params.items()}
        self._emit({"kind": "params", "values": values})

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {k: float(v) for k, v in metrics.items()}  # tensors and numpy scalars too
        self._emit({"kind": "metrics", "step": int(step), "timestamp": int(time.time() * 1000),
                    "values": values})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if not Path(path).exists():
            self._warn(f"missing:{path}", f"artifact {path} does not exist; not logged")
            return
        self._emit({"kind": "artifact", "path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._emit({"kind": "tags", "values": _jsonable(tags)})

    def end(self, status: str = "FINISHED") -> None:
        self._emit({"kind": "end", "status": status})

    def replay(self) -> int:
        """Push the offline backlog to the server, in order; returns how many records were handled.

        Handled records leave the file (the rest stay, e.g. when the server drops again midway), so
        nothing is sent twice; one MLflow refuses goes to the rejected file. Raises nothing.
        """
        if not self.offline_path.is_file():
            return 0
        lines = [ln for ln in self.offline_path.read_text().splitlines() if ln.strip()]
        done = 0
        self.offline = False
        for line in lines:
            rec = json.loads(line)
            outcome = self._call(f"replay {rec['kind']}", lambda rec=rec: self._push(rec))
            if outcome == "offline":
                break
            if outcome == "rejected":
                self._record(self.rejected_path, rec)
            done += 1
        rest = lines[done:]
        if rest:
            self.offline_path.write_text("\n".join(rest) + "\n")
        else:
            self.offline_path.unlink()
        return done

    # -- plumbing ------------------------------------------------------------------------------
    def _emit(self, rec: dict[str, Any]) -> None:
        if self.offline and not self._reconnect():
            self._record(self.offline_path, rec)
            return
        outcome = self._call(f"log {rec['kind']}", lambda: self._push(rec))
        if outcome != "ok":
            self._record(self.offline_path if outcome == "offline" else self.rejected_path, rec)

    def _push(self, rec: dict[str, Any]) -> None:
        """Send one record to MLflow; raises on any failure."""
        from mlflow.entities import Metric, Param, RunTag

        kind = rec["kind"]
        if kind == "start":
            self._start_run(rec["tags"])
            return
        if self.run_id is None:  # the run could not be created earlier: create it first
            self._start_run({})
        if kind == "metrics":
            ms = [Metric(k, v, rec["timestamp"], rec["step"]) for k, v in rec["values"].items()]
            for i in range(0, len(ms), MAX_BATCH_METRICS):
                self.client.log_batch(self.run_id, metrics=ms[i : i + MAX_BATCH_METRICS])
        elif kind == "params":
            items, full = [], {}
            for k, v in rec["values"].items():
                text, whole = _param_value(k, v)
                items.append(Param(k, text))
                if whole is not None:
                    full[k] = whole
            for i in range(0, len(items), MAX_BATCH_PARAMS):
                self.client.log_batch(self.run_id, params=items[i : i + MAX_BATCH_PARAMS])
            for k, text in full.items():
                self.client.log_text(self.run_id, text, f"params/{k}.txt")
        elif kind == "tags":
            tags = [RunTag(k, str(v)) for k, v in rec["values"].items()]
            for i in range(0, len(tags), MAX_BATCH_PARAMS):
                self.client.log_batch(self.run_id, tags=tags[i : i + MAX_BATCH_PARAMS])
        elif kind == "artifact":
            self.client.log_artifact(self.run_id, rec["path"], rec.get("artifact_path"))
        elif kind == "end":
            self.client.set_terminated(self.run_id, rec["status"])
        else:
            raise ValueError(f"{self.offline_path}: unknown record kind {kind!r}")

    def _start_run(self, tags: Mapping[str, Any]) -> None:
        if self.run_id is not None:  # resume an existing run (this also checks that it exists)
            self.client.update_run(self.run_id, status="RUNNING")
            if tags:
                self._push({"kind": "tags", "values": tags})
            return
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            artifacts = None
            if self.uri.startswith("sqlite:///"):  # keep artifacts beside the database, not in CWD
                artifacts = (Path(self.uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(self.experiment, artifact_location=artifacts, tags=EXPERIMENT_KIND)
        else:
            exp_id = exp.experiment_id
            if not any(k in exp.tags for k in EXPERIMENT_KIND):  # made by an older version or by hand
                self.client.set_experiment_tag(exp_id, *next(iter(EXPERIMENT_KIND.items())))
        run = self.client.create_run(exp_id, run_name=self.run_name,
                                     tags={k: str(v) for k, v in tags.items()})
        self.run_id = run.info.run_id

    def _reconnect(self) -> bool:
        """At most once per ``retry_after_s``: try to replay the backlog; True when back online."""
        if time.monotonic() - self._failed_at < self.retry_after_s:
            return False
        self._failed_at = time.monotonic()
        self.replay()
        return not self.offline

    def _call(self, what: str, fn) -> str:
        """Run ``fn``: "ok", "offline" (the server did not answer) or "rejected" (it said no)."""
        try:
            fn()
            return "ok"
        except Exception as exc:  # noqa: BLE001 - tracking must never raise into training
            if is_connection_error(exc):
                self.offline, self._failed_at = True, time.monotonic()
                self._warn("offline", f"MLflow at {self.uri} is unreachable ({type(exc).__name__}: "
                                      f"{str(exc)[:200]}); logging to {self.offline_path} and carrying on")
                return "offline"
            self._warn(what, f"MLflow {what} failed ({type(exc).__name__}: {str(exc)[:300]}); "
                             f"record kept in {self.rejected_path}, training goes on")
            return "rejected"

    def _warn(self, kind: str, msg: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(msg, RuntimeWarning, stacklevel=4)

    def _record(self, path: Path, rec: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"run_id": self.run_id, "experiment": self.experiment, **rec}) + "\n")


def _jsonable(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v if v is None or isinstance(v, (int, float, str, bool)) else str(v)) for k, v in d.items()}
