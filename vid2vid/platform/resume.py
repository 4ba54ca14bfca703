"""A resumed run keeps the config it was started with, unless the user says otherwise.

Starting a run under the name of an existing one resumes it. The run folder keeps the config the run
was started (or last resumed) with in ``vid2vid-run-config.json`` (runs from before this file: the
latest checkpoint's ``config.json``). A resume whose config differs is refused, naming each differing
key, unless ``train.allow_config_change=true``: then the run continues with the new values from the
schedule state of its checkpoint, and the change is recorded in MLflow as the artifact
``config_changes/resume-<time>.json`` and the tag ``config_changed`` (MLflow params are write-once, so
they keep the values the run started with).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vid2vid import storage
from vid2vid.checkpoints import CONFIG
from vid2vid.config import Config, ConfigError, flatten, to_dict

RUN_CONFIG = "vid2vid-run-config.json"
# Keys that say how far or how a run goes, not what it trains: changing them is no config change.
RUN_CONTROL_KEYS = ("train.run_name", "train.allow_config_change", "train.max_steps", "train.max_failures",
                    "train.progress_every_s", "train.report_every_s", "data.overwrite", "data.flow_actors")
MAX_TAG = 5000  # MLflow's tag values are limited; the artifact holds the whole diff


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def previous_config(run_folder: str | Path) -> dict[str, Any] | None:
    """The config a run folder (a path or a URI) was last started with; None for a new run."""
    from vid2vid.platform.locate import latest_checkpoint

    path = storage.join(run_folder, RUN_CONFIG)
    if not storage.is_file(path):
        # runs from before RUN_CONFIG: only local ones (URI run folders came with it)
        folder = None if storage.is_remote(run_folder) else storage.local_path(run_folder, "run folder")
        latest = latest_checkpoint(folder) if folder is not None and folder.is_dir() else None
        path = str(latest / CONFIG) if latest is not None else None
    if path is None:
        return None
    try:
        return json.loads(storage.read_text(path))
    except (OSError, ValueError) as err:
        raise ConfigError(f"{path}: cannot read the run's config ({err})") from None


def config_changes(before: dict[str, Any], cfg: Config) -> dict[str, tuple[Any, Any]]:
    """``key -> (value then, value now)``; a key the earlier config lacks counts at its default."""
    then = {**flatten(Config()), **_flat(before)}
    now = flatten(cfg)
    return {k: (then.get(k), v) for k, v in now.items() if k not in RUN_CONTROL_KEYS and then.get(k) != v}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changes.items())


def check_resume(cfg: Config, run_folder: str | Path) -> dict[str, tuple[Any, Any]]:
    """The config changes of resuming ``run_folder`` with ``cfg`` ({} for a new run or none); refused
    with a :class:`ConfigError` naming them unless ``train.allow_config_change``."""
    before = previous_config(run_folder)
    if before is None:
        return {}
    changes = config_changes(before, cfg)
    if changes and not cfg.train.allow_config_change:
        raise ConfigError(f"run {storage.name(run_folder)!r} exists and was started with another config "
                          f"({_listed(changes)}). "
                          f"Resume it with the same values, give another train.run_name, or add "
                          f"train.allow_config_change=true to continue it with the new values")
    return changes


def record_config(cfg: Config, run_folder: str | Path, changes: dict[str, tuple[Any, Any]], tracker: Any) -> None:
    """Keep ``cfg`` as the run's config (``run_folder``: a path or a URI); log allowed ``changes`` to MLflow
    (artifact + tag)."""
    storage.write_text(storage.join(run_folder, RUN_CONFIG), json.dumps(to_dict(cfg), indent=1))
    if not changes:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    text = json.dumps({"resumed_at": stamp, "changed": {k: {"before": a, "after": b} for k, (a, b) in changes.items()}},
                      indent=1)
    storage.write_text(storage.join(run_folder, f"config-change-{stamp}.json"), text)
    # MLflow logs a local file, and an offline record names it until it is replayed: for a URI run
    # folder, a copy in the node's local stand-in for it (storage.local_dir)
    path = storage.local_dir(run_folder) / f"config-change-{stamp}.json"
    if storage.is_remote(run_folder):
        storage.write_text(path, text)
    tracker.log_artifact(path, "config_changes")
    text = _listed(changes)
    tracker.set_tags({"config_changed": text if len(text) <= MAX_TAG else text[:MAX_TAG - 40] + " ... (see artifact)"})
