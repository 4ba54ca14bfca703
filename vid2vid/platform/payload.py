"""What the driver hands every Ray Train worker (``TorchTrainer(train_loop_config=...)``).

It lives apart from the worker loop so that unpickling it on a worker imports nothing heavy: the
``startup/imports_s`` metric measures importing the training code, after the worker started.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vid2vid.config import Config, apply_mapping


@dataclass
class WorkerPayload:
    config: dict[str, Any]  # the run's Config as a plain dict (to_dict): it pickles without surprises
    tracking: dict[str, Any] | None  # the driver's MLflow run (Tracker.identity): rank 0 logs into it
    clip_len: int  # frames per prepared clip (the schedule's cap), from the shards' manifest
    sample_dir: str  # where rank 0 leaves the closing sample video (a folder or a URI)
    verbose: bool = False  # Ray Train's per-report log stays on
    fit_time: float | None = None  # when the driver called fit(): startup/* metrics are measured from it
    fault_hook: Callable[[int], None] | None = None  # tests only: called with the step count before each step

    def train_config(self) -> Config:
        return apply_mapping(Config(), self.config)
