"""Where the time before the first training step goes.

Each process marks wall-clock moments (``time.time()``, comparable across the processes of one
machine); a Ray Train worker turns its marks into durations measured from the moment the driver
called ``TorchTrainer.fit`` and reports them with step 1 as ``startup/*`` metrics:

- ``startup/ray_train_s``: fit() -> the worker function runs (controller, placement group, worker
  processes, process group);
- ``startup/imports_s``: importing the training code (torch, DeepSpeed, the model);
- ``startup/engines_s``: building the model and the two DeepSpeed engines (DeepSpeed's comm op load);
- ``startup/first_batch_s``: restoring a checkpoint and the first clip out of the Ray Data stream;
- ``startup/step_s``: the first step itself.

The driver prints them with the first progress line; ``benchmarks/startup.py`` adds the driver's
own phases (imports, Ray start, shards).
"""

from __future__ import annotations

import time

MARKS: dict[str, float] = {}
PHASES = (("ray_train_s", "fit", "worker_start"), ("imports_s", "worker_start", "imported"),
          ("engines_s", "imported", "engines_built"), ("first_batch_s", "engines_built", "first_batch"))


def mark(name: str) -> None:
    """Record the first time ``name`` happens in this process (later calls keep the first): a worker
    process serves one run."""
    MARKS.setdefault(name, time.time())


def record(name: str) -> float:
    """Record ``name`` now, replacing an earlier one: the driver may start several runs."""
    MARKS[name] = time.time()
    return MARKS[name]


def first_step_metrics(fit_time: float | None, step_s: float) -> dict[str, float]:
    """The ``startup/*`` durations, once per process (an empty dict after the first call)."""
    if fit_time is None or MARKS.get("reported"):
        return {}
    MARKS["reported"] = 1.0
    marks = {"fit": fit_time, **MARKS}
    out = {f"startup/{name}": marks[b] - marks[a] for name, a, b in PHASES if a in marks and b in marks}
    out["startup/step_s"] = step_s
    return out
