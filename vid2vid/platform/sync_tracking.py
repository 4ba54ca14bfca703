"""``vid2vid sync-tracking run_dir=DIR [tracking_uri=URI]``: every tracking record kept offline under DIR
(trainer runs, sweep parents and trials, evaluations) pushed into its own MLflow run, exactly once.

A run that was never created (the server was down when it started) is created with the name,
experiment, tags and params its writers recorded; a sweep parent before its trials, so they nest.
Each writer's records go to the server it was given, unless ``tracking_uri`` names another (the
server moved). Running it again, or beside a training job that replays the same runs, adds nothing.
Exit status: 0 when nothing is left pending, 1 when the server still does not answer.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from pathlib import Path

from vid2vid import storage
from vid2vid.config import ConfigError
from vid2vid.platform.journal import find_journals
from vid2vid.platform.mlflow_records import ReplayReport, replay_journal

OPTIONS = ("run_dir", "tracking_uri")


def sync_run_dir(run_dir: str | Path, tracking_uri: str | None = None,
                 keys: Iterable[str] | None = None) -> list[ReplayReport]:
    """Replay every run journal under ``run_dir`` (only those of ``keys`` when given), parents first.
    For a URI run_dir (s3://...) the journals are in this node's local stand-in for it (storage.local_dir)."""
    from mlflow.tracking import MlflowClient

    journals = find_journals(storage.local_dir(run_dir))
    if keys is not None:
        wanted = set(keys)
        journals = [j for j in journals if j.key in wanted]
    pending = {j.key: j.pending() for j in journals}
    parents = {pf.header.get("parent_key") for files in pending.values() for pf in files}
    journals = [j for j in journals if pending[j.key]]
    journals.sort(key=lambda j: j.key not in parents)
    clients: dict[str, MlflowClient] = {}

    def client_for(uri: str | None) -> MlflowClient:
        uri = tracking_uri or uri
        if uri not in clients:
            clients[uri] = MlflowClient(tracking_uri=uri)
        return clients[uri]

    return [replay_journal(j, client_for, wait=True) for j in journals]


def main(args: list[str]) -> int:
    opts: dict[str, str | None] = dict.fromkeys(OPTIONS)
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep or key not in opts:
            raise ConfigError(f"sync-tracking: {arg!r} is not one of {', '.join(k + '=...' for k in OPTIONS)}")
        opts[key] = value
    if not opts["run_dir"]:
        raise ConfigError("sync-tracking needs run_dir=DIR (the train.run_dir the runs were started with)")
    run_dir = opts["run_dir"]
    local = storage.local_dir(run_dir)
    if not local.is_dir():
        where = "" if storage.is_local(run_dir) else f" (its tracking records on this node: {local})"
        print(f"vid2vid sync-tracking: {run_dir} is not a directory{where}", file=sys.stderr)
        return 2
    reports = sync_run_dir(run_dir, opts["tracking_uri"])
    for r in reports:
        line = f"  {r.key}: {r.pushed} pushed, {r.rejected} rejected -> MLflow run {r.run_id}"
        if r.pending:
            line += f"; {r.pending} still pending ({r.error or 'another process is replaying it'})"
        print(line)
    pushed, rejected, left = (sum(getattr(r, f) for r in reports) for f in ("pushed", "rejected", "pending"))
    print(f"sync-tracking {run_dir}: {pushed} records pushed, {rejected} rejected, {left} pending "
          f"({len(reports)} runs had records waiting)")
    if rejected:
        print("  rejected records are kept in each run's tracking/<run>/rejected.jsonl")
    return 1 if left else 0
