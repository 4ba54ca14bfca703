"""Warping error: zero for a video that moves exactly along its flow, positive otherwise. tOF: zero for
a video that moves like the real one, the real motion's size for a video that stands still."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vid2vid.datasets.flow import FlowEstimator
from vid2vid.eval.temporal import backward_flows, tof_terms, warping_error
from vid2vid.models.warp import warp

T, H, W = 5, 24, 32
DX, DY = 2, -1  # camera pan per frame, in pixels


def translated_video(seed: int = 0):
    """Frames cut from one big random image, the window moving by (DX, DY) per frame, with the exact
    backward flow (frame t -> t-1 is +(DX, DY)) and a confidence that is 0 where that flow leaves the
    frame (those pixels were never seen in frame t-1)."""
    g = torch.Generator().manual_seed(seed)
    big = torch.rand(3, H + 2 * T, W + 2 * T * 2, generator=g) * 2 - 1
    y0, x0 = T, 2 * T
    frames = torch.stack([big[:, y0 + t * DY:y0 + t * DY + H, x0 + t * DX:x0 + t * DX + W] for t in range(T)])
    # frame_t(p) = big(p + o_t) = frame_{t-1}(p + o_t - o_{t-1}) = frame_{t-1}(p + (DX, DY))
    flows = torch.zeros(T, 2, H, W)
    flows[:, 0], flows[:, 1] = DX, DY
    conf = torch.ones(T, 1, H, W)
    ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    inside = (xs + DX >= 0) & (xs + DX <= W - 1) & (ys + DY >= 0) & (ys + DY <= H - 1)
    conf[:, 0] = inside.float()
    return frames.unsqueeze(0), flows.unsqueeze(0), conf.unsqueeze(0)


def test_zero_for_exact_translation_under_its_flow():
    frames, flows, conf = translated_video()
    assert warping_error(frames, flows, conf) < 1e-6
    assert warping_error(frames[0], flows[0], conf[0]) < 1e-6  # unbatched (T, C, H, W) input


def test_positive_for_wrong_flow_or_broken_frame():
    frames, flows, conf = translated_video()
    assert warping_error(frames, torch.zeros_like(flows), conf) > 0.1  # flow ignored
    assert warping_error(frames, -flows, conf) > 0.1  # flow in the wrong direction
    broken = frames.clone()
    broken[:, 3] = broken[:, 3].flip(-1)  # one flickering frame
    assert warping_error(broken, flows, conf) > 0.1
    assert warping_error(frames, flows, None) > 0  # the border pixels with no source count now


def test_zero_for_video_generated_by_warping_with_fractional_flow():
    g = torch.Generator().manual_seed(1)
    first = torch.rand(2, 3, H, W, generator=g)
    flows = torch.zeros(2, T, 2, H, W)
    flows[:, 1:] = torch.randn(2, T - 1, 2, 1, 1, generator=g) * 1.7  # sub-pixel pans, per clip
    frames = [first]
    for t in range(1, T):
        frames.append(warp(frames[-1], flows[:, t]))
    assert warping_error(torch.stack(frames, dim=1), flows) < 1e-7


def test_matches_independent_computation_for_zero_flow():
    g = torch.Generator().manual_seed(2)
    frames = torch.rand(2, T, 3, H, W, generator=g)
    conf = torch.rand(2, T, 1, H, W, generator=g)
    flows = torch.zeros(2, T, 2, H, W)
    diff = (frames[:, 1:] - frames[:, :-1]).abs().double()
    assert warping_error(frames, flows) == pytest.approx(float(diff.mean()), rel=1e-6)
    w = conf[:, 1:].double()
    expected = float((diff * w).sum() / (3 * w.sum()))  # frame 0's confidence plays no part
    assert warping_error(frames, flows, conf) == pytest.approx(expected, rel=1e-6)


def test_bad_inputs_are_errors():
    frames, flows, conf = translated_video()
    with pytest.raises(ValueError, match="at least 2 frames"):
        warping_error(frames[:, :1], flows[:, :1])
    with pytest.raises(ValueError, match=r"flows must be \(1, 5, 2, 24, 32\).*flows\[:, 0\] unused"):
        warping_error(frames, flows[:, 1:])
    with pytest.raises(ValueError, match=r"confidence must be \(1, 5, 1, 24, 32\)"):
        warping_error(frames, flows, conf[:, :, 0])
    with pytest.raises(ValueError, match="confidence is zero"):
        warping_error(frames, flows, torch.zeros_like(conf))


def panning_video(h: int = 64, w: int = 96) -> np.ndarray:
    """(T, h, w, 3) uint8: a smooth textured scene panned by (DX, DY) per frame (integer crops)."""
    ys, xs = np.mgrid[0:h + 2 * T, 0:w + 4 * T].astype(np.float64)
    scene = 128 + 60 * np.sin(xs / 5.0) * np.cos(ys / 7.0) + 40 * np.sin((xs + 2 * ys) / 11.0)
    y0, x0 = T, 2 * T
    frames = [scene[y0 + t * DY:y0 + t * DY + h, x0 + t * DX:x0 + t * DX + w] for t in range(T)]
    return np.repeat(np.stack(frames)[..., None], 3, axis=-1).round().clip(0, 255).astype(np.uint8)


def test_tof_zero_for_the_same_motion_and_the_motion_size_for_a_frozen_video():
    """DIS on both sides, as the service does for synthetic shards (their exact flows are not DIS's)."""
    real = panning_video()
    dis = FlowEstimator("dis")
    real_flows = backward_flows(real, dis)
    valid = np.ones(T, bool)
    valid[0] = False
    assert tof_terms(real, real_flows, valid, dis) == (0.0, T - 1)  # the same frames: the same flows
    inner = real_flows[1:, 8:-8, 8:-8]
    assert np.abs(inner - [DX, DY]).mean() < 0.2, "DIS sees the pan"
    frozen = np.repeat(real[:1], T, axis=0)  # stands still where the real video pans by (DX, DY)
    total, pairs = tof_terms(frozen, real_flows, valid, dis)
    assert pairs == T - 1 and total / pairs == pytest.approx(np.hypot(DX, DY), rel=0.15)
    valid[2] = False  # a frame without a real flow (a stitch between stored clips) is left out
    assert tof_terms(frozen, real_flows, valid, dis)[1] == T - 2
