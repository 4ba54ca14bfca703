"""When a training rank reports to Ray Train: its first step (the startup metrics and the driver's first
progress line come with it), then at most every ``train.report_every_s`` seconds, with every
checkpoint, and at the end of the run.

Every ``ray.train.report`` is a barrier over all ranks (Ray agrees on a checkpoint folder name through
an actor), and the result goes into a queue of ONE item that Ray Train's controller drains only when it
polls the workers, every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default). Reporting every step
therefore made each step wait up to that long for the previous report to be taken, whatever the step
cost. Metrics still reach MLflow for every step (rank 0 buffers them until a checkpoint commits them,
see ``tracking.CommittedMetrics``); Ray only needs them for its own result and checkpoint bookkeeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch


class ReportCadence:
    """``due(checkpoint)`` once per step on every rank that reports; the answer is the same on all of
    them. Ranks' clocks differ, and ranks that disagreed would pair different reports in Ray's barrier
    (or wait in it forever at the end), so the ranks of ``group`` agree with one all-reduce (MAX) of
    their wishes: one rank's clock running over the interval makes all of them report."""

    def __init__(self, every_s: float, group: Any = None, device: torch.device | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.every_s = every_s
        self.group, self.device = group, device or torch.device("cpu")
        self.clock = clock
        self.last = clock()
        self.first = True  # this process's first step reports: its startup metrics ride on it

    def due(self, checkpoint: bool) -> bool:
        """Whether the coming step reports to Ray (always when it checkpoints, on the first step, or every
        step when ``every_s`` is 0)."""
        now = self.clock()
        fixed = checkpoint or self.first or self.every_s <= 0  # the same on every rank: step and config decide
        self.first = False
        wish = fixed or now - self.last >= self.every_s
        if not fixed and self._ranks() > 1:
            flag = torch.tensor([float(wish)], device=self.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX, group=self.group)
            wish = bool(flag.item())
        if wish:
            self.last = now
        return wish

    def _ranks(self) -> int:
        if self.group is None or not torch.distributed.is_initialized():
            return 1
        return torch.distributed.get_world_size(self.group)
