"""Turn generated (or real) clips into the exact input each feature network was trained on.

Input: ``frames`` (N, T, 3, H, W), float RGB in [-1, 1] (the generator's tanh range; real uint8
frames map to it as ``x / 127.5 - 1``). Output: (N, 3, T', S, S), the layout the 3D nets take.

Spatial, both nets: resize the short side to S with bilinear, antialiased interpolation (what PIL's
``Image.resize(BILINEAR)`` in both public pipelines does when it shrinks a frame), then centre-crop
S x S.

- ``i3d``: S = 224, values stay in [-1, 1] (piergiaj's and DeepMind's range), 16 frames: the FVD
  protocol's 16-frame clips at 224^2.
- ``resnext101``: S = 112, 16 frames, values on the 0-255 scale minus kenshohara's per-channel mean
  ``KENSHOHARA_MEAN`` = (114.7748, 107.7354, 99.4750) (R, G, B; ``mean.py`` of his
  video-classification-3d-cnn-pytorch, which extracts features with these models), no division by a
  standard deviation (his ``Normalize(mean, [1, 1, 1])``).

Temporal: with ``num_frames`` set (default 16) the output has exactly that many frames: longer clips
keep their first ``num_frames`` (split long videos into windows beforehand to use all frames);
shorter clips are padded by repeating their last frame. (kenshohara's ``LoopPadding`` repeats the clip
from its start instead; repeating the last frame adds no artificial cut back to frame 0, which would
look like a temporal discontinuity to a video network.) ``num_frames=None`` keeps all T frames, padding
only up to 16.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_FRAMES = 16
SIZES = {"i3d": 224, "resnext101": 112}
KENSHOHARA_MEAN = (114.7748, 107.7354, 99.4750)
_RANGE_SLACK = 1e-3  # float rounding of tanh outputs and of uint8 -> [-1, 1] conversion


def _check(frames: Tensor, net: str) -> None:
    if net not in SIZES:
        raise ValueError(f"preprocess_clips: unknown net {net!r}; valid names: {sorted(SIZES)}")
    if frames.dim() != 5 or frames.shape[2] != 3:
        raise ValueError(f"preprocess_clips: frames must be (N, T, 3, H, W), got shape {tuple(frames.shape)}")
    if not frames.is_floating_point():
        raise ValueError(f"preprocess_clips: frames must be float in [-1, 1], got dtype {frames.dtype} "
                         f"(convert uint8 frames with x / 127.5 - 1)")
    lo, hi = float(frames.min()), float(frames.max())
    if lo < -1 - _RANGE_SLACK or hi > 1 + _RANGE_SLACK:
        raise ValueError(f"preprocess_clips: frame values span [{lo:.4g}, {hi:.4g}], expected [-1, 1]")


def fit_length(frames: Tensor, num_frames: int | None, minimum: int = CLIP_FRAMES) -> Tensor:
    """(N, T, ...) -> exactly ``num_frames`` frames (or >= ``minimum`` when None); see module docstring."""
    t = frames.shape[1]
    if t < 1:
        raise ValueError("preprocess_clips: a clip needs at least one frame")
    target = max(t, minimum) if num_frames is None else num_frames
    if t >= target:
        return frames[:, :target]
    pad = frames[:, -1:].expand(-1, target - t, *frames.shape[2:])
    return torch.cat([frames, pad], dim=1)


def resize_center_crop(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): short side to ``size`` (antialiased bilinear), centre crop."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bilinear", align_corners=False,
                               antialias=True)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top:top + size, left:left + size]


def preprocess_clips(frames: Tensor, net: str, num_frames: int | None = CLIP_FRAMES) -> Tensor:
    """(N, T, 3, H, W) in [-1, 1] -> (N, 3, T', S, S) in ``net``'s input range (module docstring)."""
    _check(frames, net)
    x = fit_length(frames.float(), num_frames)
    n, t = x.shape[:2]
    x = resize_center_crop(x.reshape(n * t, *x.shape[2:]), SIZES[net])
    if net == "resnext101":
        mean = torch.tensor(KENSHOHARA_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x + 1.0) * 127.5 - mean
    return x.reshape(n, t, 3, *x.shape[-2:]).permute(0, 2, 1, 3, 4).contiguous()
