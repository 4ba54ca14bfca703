"""What ``checkpoint=`` may name: a checkpoint folder, a run folder, a run name, or an MLflow run id.

A training run keeps its checkpoints in ``<train.run_dir>/ray/<run name>/checkpoint_*`` (Ray Train's
layout); each holds ``config.json``, ``<side>/weights.pt`` and ``vid2vid-checkpoint.json`` with the
training step (the format: :mod:`vid2vid.checkpoints`). :func:`locate_checkpoint` turns any of the
four spellings into one checkpoint folder, the latest (highest step) when it is given a run, and says
which spelling it could not find.
"""

from __future__ import annotations

import re
from pathlib import Path

from vid2vid import storage
from vid2vid.checkpoints import CONFIG, RUN_ID_FILE, complete_checkpoint_step
from vid2vid.errors import CheckpointError
from vid2vid.platform.tracking import resolve_tracking_uri

CHECKPOINT_GLOB = "checkpoint_*"
RUN_ID = re.compile(r"[0-9a-f]{32}")  # an MLflow run id
SPELLINGS = "a checkpoint folder, a run folder, a run name under train.run_dir, or an MLflow run id"


def latest_checkpoint(run_folder: str | Path) -> Path | None:
    """The complete checkpoint of ``run_folder`` with the highest step (the newest name breaks ties)."""
    found = [(step, p.name, p) for p in Path(run_folder).glob(CHECKPOINT_GLOB)
             if p.is_dir() and (step := complete_checkpoint_step(p)) is not None]
    return max(found)[2] if found else None


def _from_run_folder(folder: Path, text: str) -> Path:
    latest = latest_checkpoint(folder)
    if latest is None:
        raise CheckpointError(f"checkpoint={text}: run folder {folder} holds no complete checkpoint yet "
                              f"(a run writes its first at the end of an epoch or at train.checkpoint_every)")
    return latest


def _from_mlflow(run_id: str, run_dir: Path, tracking_uri: str | None) -> Path | str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    uri = resolve_tracking_uri(tracking_uri, run_dir)
    try:
        run = MlflowClient(uri).get_run(run_id)
    except MlflowException:
        raise CheckpointError(f"checkpoint={run_id}: no MLflow run with that id at {uri} "
                              f"(give tracking_uri= or MLFLOW_TRACKING_URI for another store)") from None
    tagged = run.data.tags.get("checkpoint")
    if tagged and storage.is_remote(tagged) and storage.is_file(storage.join(tagged, CONFIG)):
        return tagged  # a checkpoint of a URI run_dir (s3://...)
    if tagged and complete_checkpoint_step(Path(tagged)) is not None:
        return Path(tagged)
    for base in dict.fromkeys([run_dir, Path(run.data.params.get("train.run_dir", run_dir))]):
        folder = base / "ray" / (run.info.run_name or "")
        if folder.is_dir() and latest_checkpoint(folder) is not None:
            return latest_checkpoint(folder)
    raise CheckpointError(f"checkpoint={run_id}: MLflow run {run.info.run_name!r} has no checkpoint tag and no "
                          f"checkpoint under {run_dir / 'ray' / (run.info.run_name or '')}")


def locate_checkpoint(text: str, run_dir: str | Path = "runs", tracking_uri: str | None = None) -> Path | str:
    """One checkpoint folder from ``text`` (see the module docstring); :class:`CheckpointError` otherwise.
    A remote URI (``s3://...``) must name a checkpoint folder itself and comes back as given."""
    if not str(text).strip():
        raise CheckpointError(f"checkpoint= is empty; give {SPELLINGS}")
    if storage.is_remote(text):
        if storage.is_file(storage.join(text, CONFIG)):
            return storage.normalize(text)
        raise CheckpointError(f"checkpoint={text}: no {CONFIG} there; a URI must name a checkpoint folder "
                              f"(<run_dir>/ray/<run>/checkpoint_*), not a run")
    path = Path(text).expanduser()
    run_dir = Path(run_dir)
    if path.is_dir():
        if (path / CONFIG).is_file():
            return path
        if is_run_folder(path):
            return _from_run_folder(path, text)
        raise CheckpointError(f"checkpoint={text}: {path} is neither a checkpoint (no {CONFIG}) nor a run "
                              f"folder (no {CHECKPOINT_GLOB} inside)")
    if path.exists():
        raise CheckpointError(f"checkpoint={text}: {path} is a file; give {SPELLINGS}")
    named = run_dir / "ray" / text
    if "/" not in text and named.is_dir():
        return _from_run_folder(named, text)
    if RUN_ID.fullmatch(text):
        return _from_mlflow(text, run_dir, tracking_uri)
    raise CheckpointError(f"checkpoint={text}: no such file or folder"
                          + ("" if "/" in text else f", and no run of that name in {run_dir / 'ray'}")
                          + (f"; give {SPELLINGS}"))


def is_run_folder(folder: Path) -> bool:
    return (folder / RUN_ID_FILE).is_file() or any(folder.glob(CHECKPOINT_GLOB))
