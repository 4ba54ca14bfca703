"""The spatio-temporally progressive schedule, as pure functions of the (0-based) epoch.

- Temporal: the clip fed to G doubles every ``niter_step`` epochs, up to ``max_frames_total`` and the
  longest clip the data has (paper Sec. 3.3; reference ``update_training_batch``).
- Learning rate (``EpochPlan.lr_factor``, which the worker sets on every engine): constant for
  ``niter`` epochs, then linear decay over ``niter_decay`` epochs. We use the CycleGAN/pix2pixHD
  "LambdaLR" form ``lr * (1 - (e - niter + 1) / (niter_decay + 1))``: every trained epoch has a
  non-zero rate and the rate would reach exactly 0 at ``e = niter + niter_decay``, the first epoch
  not trained. (The reference's ``lr * (1 - (e - niter) / niter_decay)`` applied at
  the end of 1-based epoch e is the same ramp shifted by one epoch.) The worker applies it to EVERY
  engine, D_V included (the reference never decays D_V).
- Spatial: when a finer scale is added, the coarser scales stay frozen for ``niter_fix_global``
  epochs, then everything is fine-tuned with a freshly built optimizer. The switch is not tied to a
  moment ("the first batch of epoch N"): the worker compares the epoch's plan with the frozen state
  its engines have (``ScheduleState.coarse_frozen``, saved in every checkpoint) and rebuilds when they
  differ, so a run resumed anywhere before, at or after the switch builds the optimizer the checkpoint
  was written with, and switches once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def clip_length(epoch: int, n_frames_total: int, niter_step: int, max_frames_total: int,
                available: int | None = None) -> int:
    """Frames generated per clip in ``epoch``: ``n_frames_total * 2**(epoch // niter_step)``, capped."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    if niter_step < 1:
        raise ValueError(f"train.niter_step must be >= 1, got {niter_step}")
    if n_frames_total < 1:
        raise ValueError(f"train.n_frames_total must be >= 1, got {n_frames_total}")
    # Cap the exponent before computing 2**k so a long run cannot build a huge integer.
    length = min(n_frames_total << min(epoch // niter_step, 32), max_frames_total)
    if available is not None:
        length = min(length, available)
    return max(length, 1)


def lr_factor(epoch: int, niter: int, niter_decay: int) -> float:
    """Multiplier of the base learning rate in ``epoch`` (see the module docstring)."""
    if epoch < niter:
        return 1.0
    if niter_decay <= 0:
        return 1.0  # no decay phase configured: keep the constant rate
    return max(0.0, 1.0 - (epoch - niter + 1) / (niter_decay + 1))


def coarse_frozen(epoch: int, niter_fix_global: int) -> bool:
    """True while the coarser spatial scales are frozen (only the newest, finest one trains)."""
    return epoch < niter_fix_global


@dataclass(frozen=True)
class EpochPlan:
    epoch: int
    clip_len: int
    lr_factor: float
    coarse_frozen: bool


def plan_epoch(epoch: int, train_cfg: Any, available: int | None = None) -> EpochPlan:
    """Everything the schedule decides for ``epoch`` from a ``TrainConfig``."""
    c = train_cfg
    return EpochPlan(
        epoch=epoch,
        clip_len=clip_length(epoch, c.n_frames_total, c.niter_step, c.max_frames_total, available),
        lr_factor=lr_factor(epoch, c.niter, c.niter_decay),
        coarse_frozen=coarse_frozen(epoch, c.niter_fix_global),
    )


@dataclass
class ScheduleState:
    """Where training stands; saved in every checkpoint so a resume continues exactly.

    ``batch_in_epoch`` is the data position: batches of the current epoch already consumed, so a
    resumed worker skips them instead of repeating or losing steps.
    """

    epoch: int = 0
    step: int = 0  # optimizer steps taken so far (global)
    clip_len: int = 0
    coarse_frozen: bool = False  # the coarse scales are frozen in G's engine now (its optimizer skips them)
    batch_in_epoch: int = 0
    extra: dict[str, Any] = field(default_factory=dict)  # loop-specific, JSON-serialisable

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScheduleState:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        if unknown:
            raise ValueError(f"schedule state: unknown keys {unknown}; valid keys: {names}")
        missing = [n for n in ("epoch", "step") if n not in d]
        if missing:
            raise ValueError(f"schedule state: missing keys {missing}")
        return cls(**{k: (dict(v) if k == "extra" else v) for k, v in d.items()})
