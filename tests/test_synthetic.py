"""Synthetic street scenes: determinism, shapes, labels, and that the flow is exact by construction."""

from __future__ import annotations

import numpy as np
import pytest

from vid2vid.datasets.flow import warp_image_np
from vid2vid.datasets.synthetic import (
    BACKGROUND_INSTANCE,
    CAR,
    PERSON,
    make_dataset,
    make_sequence,
)

SCENE_IDS = {7, 8, 11, 17, 21, 23, 24, 26}  # road sidewalk building pole vegetation sky person car


@pytest.fixture(scope="module")
def seq():
    return make_sequence(6, 128, 64, seed=3)


def _warp_error(seq, t, flow=None):
    flow = seq.flow[t] if flow is None else flow
    warped = warp_image_np(seq.frames[t - 1], flow).astype(np.int16)
    return np.abs(warped - seq.frames[t].astype(np.int16)).max(-1)


def test_shapes_and_dtypes(seq):
    assert seq.frames.shape == (6, 64, 128, 3) and seq.frames.dtype == np.uint8
    assert seq.labels.shape == (6, 64, 128) and seq.labels.dtype == np.uint8
    assert seq.instances.shape == (6, 64, 128) and seq.instances.dtype == np.uint8
    assert seq.flow.shape == (6, 64, 128, 2) and seq.flow.dtype == np.float32
    assert seq.valid.shape == (6, 64, 128) and seq.valid.dtype == bool
    assert seq.name == "synthetic_seed3"
    assert not seq.flow[0].any() and not seq.valid[0].any()  # no frame before the first one


def test_deterministic_by_seed():
    a, b, c = (make_sequence(4, 96, 48, seed=s) for s in (7, 7, 8))
    for field in ("frames", "labels", "instances", "flow", "valid"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    assert not np.array_equal(a.frames, c.frames)
    d1, d2 = make_dataset(2, 3, 64, 32, seed=5), make_dataset(2, 3, 64, 32, seed=5)
    assert [s.name for s in d1] == ["synthetic_5_0000", "synthetic_5_0001"]
    np.testing.assert_array_equal(d1[1].frames, d2[1].frames)
    assert not np.array_equal(d1[0].frames, d1[1].frames)


def test_labels_are_cityscapes_ids_with_foreground(seq):
    ids = set(np.unique(seq.labels).tolist())
    assert ids <= SCENE_IDS, f"unexpected label ids {ids - SCENE_IDS}"
    assert {PERSON, CAR} <= ids and {7, 8, 11, 23} <= ids
    fg = np.isin(seq.labels, [PERSON, CAR])
    assert (seq.instances[~fg] == BACKGROUND_INSTANCE).all()
    assert (seq.instances[fg] != BACKGROUND_INSTANCE).all()
    for k in np.unique(seq.instances[fg]):  # one class per instance id
        assert len(np.unique(seq.labels[seq.instances == k])) == 1


def test_flow_is_rigid_per_object(seq):
    """Every pixel of one car or pedestrian shares its object's single translation."""
    t = 3
    for k in np.unique(seq.instances[t]):
        if k == BACKGROUND_INSTANCE:
            continue
        vectors = np.unique(seq.flow[t][seq.instances[t] == k], axis=0)
        assert len(vectors) == 1, f"instance {k} has {len(vectors)} distinct flow vectors"
    sky = seq.labels[t] == 23
    assert len(np.unique(seq.flow[t][sky], axis=0)) == 1


def test_integer_motion_warp_is_exact():
    s = make_sequence(5, 128, 64, seed=11, motion="integer")
    assert np.all(s.flow == np.round(s.flow))
    for t in range(1, 5):
        assert s.valid[t].mean() > 0.9
        err = _warp_error(s, t)
        assert err[s.valid[t]].max() == 0, f"frame {t}: warp differs on valid pixels"
        assert np.abs(s.flow[t]).max() > 0  # something moves


def test_subpixel_warp_matches_and_beats_wrong_flows(seq):
    for t in range(1, 6):
        v = seq.valid[t]
        assert v.mean() > 0.85
        exact = _warp_error(seq, t)[v].mean()
        assert exact < 2.5, f"frame {t}: mean warp error {exact:.2f} grey levels"
        # the sign and the magnitude matter: negated, shifted or zero flow are clearly worse
        for wrong in (-seq.flow[t], seq.flow[t] + 0.5, np.zeros_like(seq.flow[t])):
            assert _warp_error(seq, t, wrong)[v].mean() > exact + 1.0


def test_invalid_target_outside_image():
    s = make_sequence(3, 64, 32, seed=1)
    h, w = s.flow.shape[1:3]
    xs = np.arange(w)[None, :] + s.flow[2][..., 0]
    ys = np.arange(h)[:, None] + s.flow[2][..., 1]
    outside = (xs < 0) | (xs > w - 1) | (ys < 0) | (ys > h - 1)
    assert not s.valid[2][outside].any()


@pytest.mark.parametrize("args, match", [((0, 64, 32, 0), "num_frames"), ((2, 16, 32, 0), "width and height")])
def test_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        make_sequence(*args)
    with pytest.raises(ValueError, match="motion"):
        make_sequence(2, 64, 32, 0, motion="fast")
