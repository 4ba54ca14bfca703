"""The progressive schedule: clip length, LR decay on every optimizer, spatial freeze, state round trip."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch

from vid2vid.config import Config, TrainConfig
from vid2vid.platform.worker import begin_epoch
from vid2vid.training.schedule import (
    ScheduleState,
    clip_length,
    coarse_frozen,
    lr_factor,
    plan_epoch,
)


def test_clip_length_doubles_every_niter_step_and_is_capped():
    got = [clip_length(e, 4, 2, 28) for e in range(10)]
    assert got == [4, 4, 8, 8, 16, 16, 28, 28, 28, 28]
    # The reference Cityscapes setting: 30-frame clips leave 28 frames to generate.
    assert clip_length(100, 6, 5, 28) == 28
    # The data can be shorter than the cap.
    assert clip_length(9, 6, 5, 28, available=10) == 10
    assert clip_length(10**6, 1, 1, 28) == 28  # no overflow for absurd epochs


@pytest.mark.parametrize("bad, msg", [(dict(niter_step=0), "niter_step"), (dict(epoch=-1), "epoch"),
                                      (dict(n=0), "n_frames_total")])
def test_clip_length_rejects_bad_input(bad, msg):
    args = dict(epoch=0, n=4, niter_step=2) | bad
    with pytest.raises(ValueError, match=msg):
        clip_length(args["epoch"], args["n"], args["niter_step"], 28)


def test_lr_factor_is_linear_to_zero_after_niter():
    niter, decay = 3, 4
    got = [lr_factor(e, niter, decay) for e in range(9)]
    want = [1, 1, 1, 0.8, 0.6, 0.4, 0.2, 0.0, 0.0]  # 1 - (e - 3 + 1) / 5
    assert got == pytest.approx(want)
    # Every trained epoch (0 .. niter + decay - 1) has a positive rate.
    assert all(lr_factor(e, niter, decay) > 0 for e in range(niter + decay))
    assert lr_factor(50, 10, 0) == 1.0  # no decay phase: constant


def test_each_epoch_sets_the_decayed_rate_on_every_engine_and_each_d_v():
    """What the worker does at an epoch's start (``worker.begin_epoch``): the base rate times the plan's
    ``lr_factor`` on every parameter group of every engine the rank holds. D_I and each D_V are groups
    of the discriminator's one engine (here an object holding an optimizer, as a DeepSpeed engine does)."""

    class EngineLike:
        def __init__(self, groups: int):
            nets = [torch.nn.Linear(2, 2) for _ in range(groups)]
            self.optimizer = torch.optim.Adam([{"params": n.parameters()} for n in nets], lr=1.0)

    cfg = Config()
    cfg.train = dataclasses.replace(cfg.train, lr=2e-4, niter=10, niter_decay=9)
    state = ScheduleState(epoch=12)
    wc = SimpleNamespace(cfg=cfg, clip_len=None, engines={"generator": EngineLike(1), "discriminator": EngineLike(3)})
    plan = begin_epoch(wc, state)
    assert plan.lr_factor == pytest.approx(0.7)  # 1 - 3/10
    for engine in wc.engines.values():
        assert [g["lr"] for g in engine.optimizer.param_groups] == pytest.approx([2e-4 * 0.7] * len(
            engine.optimizer.param_groups))
    begin_epoch(wc, ScheduleState(epoch=19))  # the last trained epoch: 1 - 10/10 = 0
    assert all(g["lr"] == 0.0 for e in wc.engines.values() for g in e.optimizer.param_groups)


def test_spatial_fine_tuning_switch():
    assert [coarse_frozen(e, 3) for e in range(5)] == [True, True, True, False, False]
    assert not any(coarse_frozen(e, 0) for e in range(3))


def test_plan_epoch_reads_train_config():
    cfg = TrainConfig(n_frames_total=4, niter_step=2, max_frames_total=12, niter=2, niter_decay=3,
                      niter_fix_global=2)
    p = plan_epoch(2, cfg, available=30)
    assert (p.clip_len, p.lr_factor, p.coarse_frozen) == (8, 0.75, False)
    assert plan_epoch(0, cfg).coarse_frozen and plan_epoch(9, cfg).clip_len == 12


def test_schedule_state_round_trip_and_errors():
    s = ScheduleState(epoch=3, step=120, clip_len=8, coarse_frozen=True, batch_in_epoch=7,
                      extra={"seed": 5})
    d = s.to_dict()
    assert ScheduleState.from_dict(d) == s
    assert d["batch_in_epoch"] == 7
    with pytest.raises(ValueError, match="bogus"):
        ScheduleState.from_dict(d | {"bogus": 1})
    with pytest.raises(ValueError, match="step"):
        ScheduleState.from_dict({"epoch": 1})
