"""The progressive schedule: clip length, LR decay on every optimizer, spatial freeze, state round trip."""

from __future__ import annotations

import pytest
import torch

from vid2vid.config import TrainConfig
from vid2vid.platform.schedule import (
    ScheduleState,
    apply_lr_decay,
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


def test_lr_decay_reaches_every_optimizer_including_each_d_v():
    net = torch.nn.Linear(2, 2)
    opts = {name: torch.optim.Adam(net.parameters(), lr=1.0) for name in ("G", "D_I", "D_V0", "D_V1")}
    base = {"G": 1e-4, "D_I": 4e-4, "D_V0": 2e-4, "D_V1": 2e-4}
    out = apply_lr_decay(opts, base, epoch=12, niter=10, niter_decay=9)  # factor 1 - 3/10 = 0.7
    for name, opt in opts.items():
        assert opt.param_groups[0]["lr"] == pytest.approx(base[name] * 0.7)
        assert out[name] == pytest.approx(base[name] * 0.7)
    with pytest.raises(KeyError, match="D_V1"):
        apply_lr_decay(opts, {"G": 1.0, "D_I": 1.0, "D_V0": 1.0}, 12, 10, 9)


def test_lr_decay_accepts_an_object_with_an_optimizer_like_a_deepspeed_engine():
    class FakeEngine:
        optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)

    eng = FakeEngine()
    apply_lr_decay({"G": eng}, 2e-4, epoch=1, niter=0, niter_decay=1)  # factor 1 - 2/2 = 0
    assert eng.optimizer.param_groups[0]["lr"] == 0.0
    with pytest.raises(TypeError, match="param_groups"):
        apply_lr_decay({"x": object()}, 1.0, 0, 0, 1)


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
