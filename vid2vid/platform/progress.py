"""The driver's view of a training run: how many steps it will take, and one progress line per step.

``plan_steps`` says before the run starts how many steps the epoch schedule allows
(``niter + niter_decay`` epochs of ``clips // generator ranks // batch_size`` steps), so a
``train.max_steps`` the schedule ends before is announced rather than silently cut short.

Ray Train calls user callbacks in its controller actor, not in the driver process. So
:class:`Progress` hands Ray Train a callback that prints a few numbers of each report, marked, in the
controller; Ray forwards the controller's output to the driver, where the marked line is taken out of
the stream (``console.route_worker_lines``) and becomes the progress line::

    step 5/8  epoch 1/2  G 12.31  D 1.021  3.4 frames/s  ETA 0:00:09

at every step, but at most one every ``train.progress_every_s`` seconds (the first and the last step,
and steps that save a checkpoint, always print).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from vid2vid.console import route_worker_lines

log = logging.getLogger("vid2vid.train")


@dataclass(frozen=True)
class StepPlan:
    total: int  # the step this run ends at
    schedule: int  # the step the epoch schedule ends at
    per_epoch: int
    epochs: int
    clips: int
    readers: int  # generator ranks: each streams clips // readers clips per epoch

    def describe(self, max_steps: int) -> str:
        why = (f"{self.epochs} epochs (train.niter + train.niter_decay) x {self.per_epoch} steps "
               f"({self.clips} clips over {self.readers} generator rank{'s' * (self.readers > 1)})")
        if max_steps <= 0:
            return f"{self.total} steps: {why}"
        if max_steps <= self.schedule:
            return f"{self.total} steps (train.max_steps; the schedule allows {self.schedule}: {why})"
        return (f"{self.total} steps, not train.max_steps={max_steps}: the schedule ends first after {why}; "
                f"raise train.niter / train.niter_decay to train longer")


def plan_steps(train_cfg: Any, clips: int, readers: int) -> StepPlan:
    per_epoch = (clips // max(readers, 1)) // max(train_cfg.batch_size, 1)
    epochs = train_cfg.niter + train_cfg.niter_decay
    schedule = per_epoch * epochs
    total = min(train_cfg.max_steps, schedule) if train_cfg.max_steps > 0 else schedule
    return StepPlan(total, schedule, per_epoch, epochs, clips, readers)


def summarize_report(metrics: list[dict[str, Any]], checkpoint: bool) -> dict[str, Any]:
    """The few numbers of one report the progress line shows (G from G ranks, D from D ranks)."""
    def first(key):
        return next((float(m[key]) for m in metrics if key in m), None)

    out = {"step": int(max((m.get("step", 0) for m in metrics), default=0)), "epoch": first("epoch"),
           "G": first("G/total"), "D": first("D/total"), "checkpoint": checkpoint,
           "fps": sum(float(m.get("frames_per_s", 0.0)) for m in metrics if "G/total" in m),
           "time": time.time()}
    out.update({k: float(v) for m in metrics for k, v in m.items() if k.startswith("startup/")})
    return out


MARKER = "vid2vid-progress "


def make_callback():
    """A ``ray.train.UserCallback``: it runs in Ray Train's controller and prints each report's summary
    behind :data:`MARKER`; Ray forwards the line to the driver, where :class:`Progress` takes it."""
    import ray.train

    class ProgressCallback(ray.train.UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            try:
                print(MARKER + json.dumps(summarize_report(metrics or [], checkpoint is not None)), flush=True)
            except Exception:  # noqa: BLE001 - a progress line is never worth a failed run
                pass

    return ProgressCallback()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """Driver side: ``with Progress(plan, every_s, fit_time) as p: ...RunConfig(callbacks=[p.callback])``."""

    def __init__(self, plan: StepPlan, every_s: float, fit_time: float):
        self.plan, self.every_s, self.fit_time = plan, every_s, fit_time
        self.callback = make_callback()
        self.first: tuple[float, int] | None = None
        self.last_print = 0.0
        self.last_step = 0

    def __enter__(self) -> Progress:
        route_worker_lines(MARKER, self._line)
        return self

    def __exit__(self, *exc) -> None:
        route_worker_lines(MARKER, None)

    def wait_for(self, step: int, timeout_s: float = 5.0) -> None:
        """Give the last lines time to arrive: Ray forwards them from the controller's log."""
        deadline = time.monotonic() + timeout_s
        while self.last_step < step and time.monotonic() < deadline:
            time.sleep(0.1)

    def _line(self, text: str) -> None:
        try:
            self.show(json.loads(text))
        except Exception:  # noqa: BLE001 - a malformed line is dropped, never fatal
            log.debug("progress line not understood: %r", text)

    def show(self, item: dict[str, Any]) -> None:
        step, now = item["step"], item["time"]
        if item["G"] is None:  # an end-of-epoch checkpoint report: no losses
            if item["checkpoint"] and step == self.last_step:
                log.info("checkpoint saved at step %d", step)
            return
        if self.first is None:
            self.first = (now, step)
            log.info("first step done %.1f s after Ray Train was asked to start%s", now - self.fit_time,
                     startup_text(item))
        due = (step == self.first[1] or step >= self.plan.total or item["checkpoint"]
               or now - self.last_print >= self.every_s)
        self.last_step = step
        if not due:
            return
        self.last_print = now
        t0, s0 = self.first
        eta = "" if step == s0 else f"  ETA {_clock((self.plan.total - step) * (now - t0) / (step - s0))}"
        epoch = "" if item["epoch"] is None else f"  epoch {int(item['epoch']) + 1}/{self.plan.epochs}"
        d = "" if item["D"] is None else f"  D {item['D']:.4g}"
        log.info("step %d/%d%s  G %.4g%s  %.2f frames/s%s%s", step, self.plan.total, epoch, item["G"], d,
                 item["fps"], eta, "  (checkpoint)" if item["checkpoint"] else "")


def startup_text(item: dict[str, Any]) -> str:
    names = (("ray_train_s", "Ray Train start"), ("imports_s", "imports"), ("engines_s", "model + DeepSpeed"),
             ("first_batch_s", "first batch"), ("step_s", "the step"))
    parts = [f"{label} {item[f'startup/{key}']:.1f} s" for key, label in names if f"startup/{key}" in item]
    return f" ({', '.join(parts)})" if parts else ""
