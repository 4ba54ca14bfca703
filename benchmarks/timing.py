"""The one timer of the benchmarks: interleaved runs of the things compared, medians with quartiles,
and the closing ``ratio NAME: X (bar B)`` line every benchmark prints.

A ratio is only as good as the conditions of its two sides. Measured one after the other, machine drift
(another process, thermal state, a cache) lands on one side; so the sides run interleaved in one
process, in ABBA order (A B, then B A, ...), and each round gives one paired ratio. The median of the
paired ratios and its quartiles is what a benchmark reports.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # asynchronous kernels are counted where they were queued


@dataclass(frozen=True)
class Summary:
    """Median and quartiles of some values (times in seconds, or ratios)."""

    median: float
    q1: float
    q3: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        values = sorted(values)
        if len(values) == 1:
            return cls(values[0], values[0], values[0], 1)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(statistics.median(values), q1, q3, len(values))

    def format(self, unit: str = "s", scale: float = 1.0, digits: int = 3) -> str:
        m, a, b = (v * scale for v in (self.median, self.q1, self.q3))
        return f"{m:.{digits}f}{unit} (quartiles {a:.{digits}f}-{b:.{digits}f}, n={self.n})"


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds of each function per round, the functions run in ABBA order (round r forwards when r is
    even, backwards when odd) after ``warmup`` untimed rounds (allocator, kernels, caches)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            _sync()
            t0 = time.perf_counter()
            fns[name]()
            _sync()
            times[name].append(time.perf_counter() - t0)
    return times


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> Summary:
    """The median and quartiles of the per-round ratios ``numerator[i] / denominator[i]``."""
    return Summary.of([a / b for a, b in zip(numerator, denominator, strict=True)])


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run (one side alone: use
    :func:`interleaved` for anything compared)."""
    return statistics.median(interleaved({"fn": fn}, repeats)["fn"])


def print_ratio(name: str, value: float, bar: str) -> bool:
    """The closing line of a benchmark, e.g. ``ratio train_loop: 1.04 (bar <= 1.10)``; ``bar`` is an
    operator and a number. Returns whether the bar is met."""
    op, limit = bar.split()
    met = {"<=": value <= float(limit), ">=": value >= float(limit)}[op]
    print(f"ratio {name}: {value:.2f} (bar {bar})")
    return met
