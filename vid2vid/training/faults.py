"""Fault injection for tests: a hook the worker calls before each step, handed to ``train`` by the
test (production runs pass none). It travels to the Ray Train workers pickled, so it is a plain
top-level class."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KillOnce:
    """The process dies once at each step of ``steps``, before taking the step after it. The marker file
    lists the steps it died at, so the restarted worker carries on."""

    steps: tuple[int, ...]
    marker: str

    def __call__(self, step: int) -> None:
        if step not in self.steps:
            return
        marker = Path(self.marker)
        done = json.loads(marker.read_text()) if marker.exists() else []
        if step not in done:
            marker.write_text(json.dumps([*done, step]))
            os._exit(1)  # a hard kill, as a lost node would be
