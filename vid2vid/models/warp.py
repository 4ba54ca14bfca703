"""Backward warping of an image by a dense optical flow given in pixels.

The reference built an ``align_corners=True`` grid (``linspace(-1, 1, W)``) but called ``grid_sample``
with the post-1.3 default ``align_corners=False``, so every warp was off by half a pixel and even a
zero flow blurred the image. Here the grid is built in pixel coordinates and normalised with the same
convention that ``grid_sample`` is told to use, so a zero flow is the identity and an integer flow is an
exact shift.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _check(image: Tensor, flow: Tensor) -> None:
    if image.dim() != 4:
        raise ValueError(f"warp: image must be (N,C,H,W), got shape {tuple(image.shape)}")
    n, _, h, w = image.shape
    if flow.shape != (n, 2, h, w):
        raise ValueError(
            f"warp: flow must be (N,2,H,W) = {(n, 2, h, w)} to match image {tuple(image.shape)}, "
            f"got {tuple(flow.shape)}"
        )


def warp(image: Tensor, flow: Tensor) -> Tensor:
    """``out(p) = image(p + flow(p))``, bilinear, border padding, differentiable in both inputs.

    ``flow`` is in pixels: channel 0 moves along x (width), channel 1 along y (height). The sampling runs
    in at least float32 whatever the input precision (bf16 grid coordinates lose whole pixels at 2K
    width) and the result is cast back to ``image.dtype``; float64 stays float64.
    """
    _check(image, flow)
    n, _, h, w = image.shape
    work = torch.promote_types(torch.promote_types(image.dtype, flow.dtype), torch.float32)
    img = image.to(work)
    fl = flow.to(work)
    ys = torch.arange(h, device=image.device, dtype=work).view(1, h, 1)
    xs = torch.arange(w, device=image.device, dtype=work).view(1, 1, w)
    x = xs + fl[:, 0]
    y = ys + fl[:, 1]
    # align_corners=True: -1 is the centre of pixel 0 and +1 the centre of pixel size-1. A size-1 axis
    # has a single sample whatever the coordinate; max(., 1) only avoids the division by zero.
    gx = x * (2.0 / max(w - 1, 1)) - 1.0
    gy = y * (2.0 / max(h - 1, 1)) - 1.0
    grid = torch.stack((gx, gy), dim=-1)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    return out.to(image.dtype)
