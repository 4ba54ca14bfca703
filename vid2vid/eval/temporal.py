"""Temporal consistency of generated video: warping error under the ground-truth flow, and tOF.

A temporally consistent video moves the way the real one does, so frame t should equal frame t-1
warped by the real flow wherever that flow is reliable. The metric is the mean absolute difference
per channel over confident pixels, on the [-1, 1] frame scale (0 = perfectly consistent):

    E = sum_{n, t>=1, c, p} conf_t(p) |x_t(p) - warp(x_{t-1}, f_t)(p)| / (C * sum_{n, t>=1, p} conf_t(p))

Normalising by the confidence mass (not by the pixel count, as the training loss does) keeps the
number comparable between clips whose flows are reliable on different fractions of the frame.

Flow convention (as in the shards and the training losses): ``flows[:, t]`` maps frame t to frame t-1,
so ``warp(x[:, t-1], flows[:, t]) ~ x[:, t]``; ``flows[:, 0]`` is unused.

tOF (Chu et al., TecoGAN, 2020): how differently the generated video moves from the real one,

    tOF = mean_{t >= 1} mean_p | flow(fake_t -> fake_{t-1})(p) - flow(real_t -> real_{t-1})(p) |_2

with the project's flow estimator (OpenCV DIS by default, RAFT-small for shards prepared with it;
TecoGAN used Farneback) at the shards' resolution, in pixels; 0 = the same motion. The real flows
are the shards' own (computed once at prepare) when they were estimated with that estimator.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from vid2vid.models.warp import warp


def warping_error(frames: Tensor, flows: Tensor, confidence: Tensor | None = None) -> float:
    """Warping error (see module docstring) of ``frames`` (N, T, C, H, W) or (T, C, H, W) under
    ``flows`` (N, T, 2, H, W) or (T, 2, H, W), optionally weighted by ``confidence`` (N, T, 1, H, W)
    or (T, 1, H, W) in [0, 1]."""
    if frames.dim() not in (4, 5):
        raise ValueError(f"warping_error: frames must be (N, T, C, H, W) or (T, C, H, W), "
                         f"got {tuple(frames.shape)}")
    unbatched = frames.dim() == 4
    x = frames.unsqueeze(0) if unbatched else frames
    f = flows.unsqueeze(0) if unbatched else flows
    conf = confidence.unsqueeze(0) if unbatched and confidence is not None else confidence
    n, t, c, h, w = x.shape
    if t < 2:
        raise ValueError(f"warping_error: needs at least 2 frames, got {t}")
    if tuple(f.shape) != (n, t, 2, h, w):
        raise ValueError(f"warping_error: flows must be {(n, t, 2, h, w)} for frames {tuple(x.shape)} "
                         f"(flows[:, t] maps frame t to t-1; flows[:, 0] unused), got {tuple(f.shape)}")
    if conf is not None and tuple(conf.shape) != (n, t, 1, h, w):
        raise ValueError(f"warping_error: confidence must be {(n, t, 1, h, w)}, got {tuple(conf.shape)}")
    with torch.no_grad():
        x, f = x.float(), f.float()
        total = torch.zeros((), dtype=torch.float64)
        mass = torch.zeros((), dtype=torch.float64)
        for i in range(1, t):
            diff = (x[:, i] - warp(x[:, i - 1], f[:, i])).abs()
            if conf is None:
                total += diff.sum(dtype=torch.float64)
                mass += diff.numel()
            else:
                weight = conf[:, i].float()
                total += (diff * weight).sum(dtype=torch.float64)
                mass += weight.sum(dtype=torch.float64) * c
    if float(mass) <= 0:
        raise ValueError("warping_error: the confidence is zero on every pixel of frames 1..T-1")
    return float(total / mass)


def backward_flows(frames: np.ndarray, estimator) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, H, W, 2) float32 with ``flow[t] = estimator(frames[t], frames[t-1])``
    (the shards' convention); ``flow[0] = 0``."""
    flows = np.zeros(frames.shape[:3] + (2,), np.float32)
    for t in range(1, len(frames)):
        flows[t] = estimator(frames[t], frames[t - 1])
    return flows


def tof_terms(fake: np.ndarray, real_flows: np.ndarray, valid: np.ndarray, estimator) -> tuple[float, int]:
    """(sum over frame pairs, number of pairs) of tOF for one clip (module docstring): ``fake``
    (T, H, W, 3) uint8, ``real_flows`` (T, H, W, 2) backward flows of the real clip, ``valid`` (T,)
    bool: frame pairs whose real flow exists (frame 0 never)."""
    if fake.shape[:3] != real_flows.shape[:3] or len(valid) != len(fake):
        raise ValueError(f"tof_terms: frames {fake.shape}, real flows {real_flows.shape} and valid {len(valid)} "
                         f"disagree")
    total, pairs = 0.0, 0
    for t in np.flatnonzero(valid):
        if t == 0:
            continue
        flow = estimator(fake[t], fake[t - 1])
        total += float(np.linalg.norm(flow - real_flows[t].astype(np.float32), axis=-1).mean())
        pairs += 1
    return total, pairs
