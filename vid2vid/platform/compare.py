"""Comparison of a sweep's trials: per-variant tables (CSV, markdown) and plots (PNG).

Pure functions over :class:`TrialRecord` rows, so the sweep, the tests and a notebook share them.
A variant's number is the mean over its seeds with the sample standard deviation (ddof=1) as the
spread: with one seed the spread is unknown, written as an empty cell / "n/a", never as 0.

Fréchet metrics come with a 95% bootstrap interval over the evaluated clips (``<metric>/ci95_low``,
``<metric>/ci95_high``, and ``<metric>/clips``, logged by the eval service). A group's interval is the
mean of its seeds' bounds. Against the first group (the reference: ``full`` in an ablation sweep),
a difference whose intervals overlap is marked ``≈``: the evaluation's sampling noise alone could
explain it. Disjoint intervals do not make a difference certain either (seeds vary too: see the std).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

# Metric columns first in this order when present (evaluation, then the losses, then the size).
PREFERRED_ORDER = ("eval/", "random_weights/eval/", "G/total", "D/total", "params/")
# What the comparison table and the per-variant plot show; trials.csv keeps every loss term. The loss
# totals sum different terms per variant (no flow losses without flow warping), so the evaluation
# metrics are what compares variants; the totals are there to spot a diverged trial.
HEADLINE = ("eval/", "random_weights/eval/", "G/total", "D/total", "params/generator", "params/discriminator")
LOW, HIGH, CLIPS = "/ci95_low", "/ci95_high", "/clips"  # companions of a metric, not columns of their own
NOT_SUPPORTED = "≈"


@dataclass
class TrialRecord:
    """One finished trial of a sweep."""

    group: str  # what the table compares: the variant, plus the grid setting when the sweep has one
    variant: str
    seed: int
    label: str  # unique per trial, e.g. "no_flow_warping-s1"
    run_id: str | None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class GroupSummary:
    group: str
    seeds: list[int]
    mean: dict[str, float]
    std: dict[str, float | None]  # None: fewer than two seeds had the metric
    low: dict[str, float] = field(default_factory=dict)  # 95% interval (mean of the seeds' bounds)
    high: dict[str, float] = field(default_factory=dict)
    clips: dict[str, float] = field(default_factory=dict)  # clips behind the metric (mean over seeds)

    def interval(self, metric: str) -> tuple[float, float] | None:
        return (self.low[metric], self.high[metric]) if metric in self.low and metric in self.high else None


def is_companion(name: str) -> bool:
    return name.endswith((LOW, HIGH, CLIPS))


def supported(a: GroupSummary, b: GroupSummary, metric: str) -> bool | None:
    """Whether the intervals support a difference between ``a`` and ``b`` on ``metric`` (they are
    disjoint); None when either has no interval."""
    ia, ib = a.interval(metric), b.interval(metric)
    if ia is None or ib is None:
        return None
    return ia[1] < ib[0] or ib[1] < ia[0]


@dataclass
class LossHistory:
    label: str
    group: str
    curves: dict[str, list[tuple[int, float]]]  # metric -> [(step, value)]


def metric_columns(records: Iterable[TrialRecord]) -> list[str]:
    """Every numeric metric of any record, in :data:`PREFERRED_ORDER` then alphabetical."""
    names = sorted({k for r in records for k, v in r.metrics.items() if _is_number(v)})

    def rank(name: str) -> tuple[int, str]:
        for i, prefix in enumerate(PREFERRED_ORDER):
            if name.startswith(prefix):
                return i, name
        return len(PREFERRED_ORDER), name

    return sorted(names, key=rank)


def headline_metrics(names: Iterable[str]) -> list[str]:
    return [n for n in names if n.startswith(HEADLINE) and not is_companion(n)]


def summarize(records: Sequence[TrialRecord], metrics: Sequence[str]) -> list[GroupSummary]:
    """Mean and sample std over seeds per group, groups in first-seen order (the sweep's order)."""
    groups: dict[str, list[TrialRecord]] = {}
    for r in records:
        groups.setdefault(r.group, []).append(r)
    out = []
    for group, rows in groups.items():
        summary = GroupSummary(group, sorted(r.seed for r in rows), {}, {})
        for m in metrics:
            values = [float(r.metrics[m]) for r in rows if _is_number(r.metrics.get(m))]
            if not values:
                continue
            mu = sum(values) / len(values)
            summary.mean[m] = mu
            summary.std[m] = (math.sqrt(sum((v - mu) ** 2 for v in values) / (len(values) - 1))
                              if len(values) > 1 else None)
            for suffix, target in ((LOW, summary.low), (HIGH, summary.high), (CLIPS, summary.clips)):
                bounds = [float(r.metrics[m + suffix]) for r in rows if _is_number(r.metrics.get(m + suffix))]
                if bounds:
                    target[m] = sum(bounds) / len(bounds)
        out.append(summary)
    return out


def write_trials_csv(records: Sequence[TrialRecord], metrics: Sequence[str], path: Path) -> Path:
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["group", "variant", "seed", "label", "run_id", *metrics])
        for r in records:
            w.writerow([r.group, r.variant, r.seed, r.label, r.run_id or "",
                        *(_fmt_csv(r.metrics.get(m)) for m in metrics)])
    return Path(path)


def _with_intervals(summaries: Sequence[GroupSummary], metrics: Sequence[str]) -> set[str]:
    return {m for m in metrics if any(s.interval(m) for s in summaries)}


def write_comparison_csv(summaries: Sequence[GroupSummary], metrics: Sequence[str], path: Path) -> Path:
    """One row per group: ``<metric>_mean`` and ``<metric>_std`` columns (std empty with one seed); for
    metrics with intervals also ``_ci95_low``, ``_ci95_high``, ``_clips`` and ``_vs_reference``
    (``supported``, ``not supported``; empty for the reference, the first group)."""
    ci = _with_intervals(summaries, metrics)
    head = ["group", "num_seeds", "seeds"]
    for m in metrics:
        head += [f"{m}_mean", f"{m}_std"] + ([f"{m}_ci95_low", f"{m}_ci95_high", f"{m}_clips",
                                              f"{m}_vs_reference"] if m in ci else [])
    with Path(path).open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(head)
        for i, s in enumerate(summaries):
            cells = []
            for m in metrics:
                cells += [_fmt_csv(s.mean.get(m)), _fmt_csv(s.std.get(m))]
                if m in ci:
                    verdict = None if i == 0 else supported(s, summaries[0], m)
                    cells += [_fmt_csv(s.low.get(m)), _fmt_csv(s.high.get(m)), _fmt_csv(s.clips.get(m)),
                              "" if verdict is None else ("supported" if verdict else "not supported")]
            w.writerow([s.group, len(s.seeds), " ".join(map(str, s.seeds)), *cells])
    return Path(path)


def comparison_markdown(summaries: Sequence[GroupSummary], metrics: Sequence[str], title: str = "") -> str:
    head = ["variant", "seeds", *metrics]
    lines = [f"### {title}", ""] if title else []
    lines += ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * len(metrics)) + "|"]
    marked = False
    for i, s in enumerate(summaries):
        cells = [s.group, str(len(s.seeds))]
        for m in metrics:
            if m not in s.mean:
                cells.append("—")
                continue
            cell = _fmt(s.mean[m]) if s.std.get(m) is None else f"{_fmt(s.mean[m])} ± {_fmt(s.std[m])}"
            if s.interval(m):
                cell += f" [{_fmt(s.low[m])}, {_fmt(s.high[m])}]"
                if m in s.clips:
                    cell += f" n={s.clips[m]:.0f}"
            if i > 0 and supported(s, summaries[0], m) is False:
                cell = f"{NOT_SUPPORTED} {cell}"
                marked = True
            cells.append(cell)
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "mean ± sample std over seeds (a value without ± comes from one seed). G/total and D/total "
              "sum different loss terms per variant: compare variants by the eval metrics."]
    if _with_intervals(summaries, metrics):
        lines += ["", f"[low, high]: 95% bootstrap interval over the n evaluated clips (mean of the seeds' bounds). "
                  f"{NOT_SUPPORTED}: the interval overlaps the reference's ({summaries[0].group}), so the "
                  f"difference is within the evaluation's sampling noise: not supported."
                  + ("" if marked else " No difference is marked.")]
    return "\n".join(lines) + "\n"


def plot_metrics(records: Sequence[TrialRecord], metrics: Sequence[str], path: Path) -> Path:
    """One panel per metric: each seed as a dot, the variant mean as a bar, ± std as an error bar."""
    plt = _pyplot()
    summaries = summarize(records, metrics)
    groups = [s.group for s in summaries]
    n = max(1, len(metrics))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, m in zip(axes.flat, metrics, strict=False):
        means = [s.mean.get(m, math.nan) for s in summaries]
        errs = [s.std.get(m) or 0.0 for s in summaries]
        x = range(len(groups))
        ax.bar(x, means, yerr=errs, capsize=4, color="#9ecae1", edgecolor="#3182bd")
        for i, g in enumerate(groups):
            ys = [r.metrics[m] for r in records if r.group == g and _is_number(r.metrics.get(m))]
            ax.scatter([i] * len(ys), ys, color="#08306b", s=14, zorder=3)
        ax.set_xticks(list(x), groups, rotation=30, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.suptitle("per variant: bar = mean, error bar = std over seeds, dots = seeds", fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_loss_curves(histories: Sequence[LossHistory], path: Path) -> Path:
    """One panel per loss; one line per trial, coloured by group."""
    plt = _pyplot()
    names = sorted({m for h in histories for m in h.curves})
    groups = list(dict.fromkeys(h.group for h in histories))
    colours = {g: plt.get_cmap("tab10")(i % 10) for i, g in enumerate(groups)}
    n = max(1, len(names))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, m in zip(axes.flat, names, strict=False):
        for h in histories:
            pts = sorted(h.curves.get(m, []))
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", ms=3, color=colours[h.group],
                        label=h.label)
        ax.set_title(m, fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display on a cluster node or in CI
    import matplotlib.pyplot as plt

    return plt


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))


def _fmt(v: float | None) -> str:
    if v is None:
        return ""
    return f"{v:,.0f}" if abs(v) >= 1e4 else f"{v:.4g}"


def _fmt_csv(v: object) -> str:
    return repr(float(v)) if _is_number(v) else ""

