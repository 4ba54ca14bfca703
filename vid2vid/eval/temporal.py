"""Temporal consistency of generated video: warping error under the ground-truth flow.

A temporally consistent video moves the way the real one does, so frame t should equal frame t-1
warped by the real flow wherever that flow is reliable. The metric is the mean absolute difference
per channel over confident pixels, on the [-1, 1] frame scale (0 = perfectly consistent):

    E = sum_{n, t>=1, c, p} conf_t(p) |x_t(p) - warp(x_{t-1}, f_t)(p)| / (C * sum_{n, t>=1, p} conf_t(p))

Normalising by the confidence mass (not by the pixel count, as the training loss does) keeps the
number comparable between clips whose flows are reliable on different fractions of the frame.

Flow convention (as in the shards and the training losses): ``flows[:, t]`` maps frame t to frame t-1,
so ``warp(x[:, t-1], flows[:, t]) ~ x[:, t]``; ``flows[:, 0]`` is unused.
"""

from __future__ import annotations

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
