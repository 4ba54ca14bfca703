"""Turn generated (or real) clips into the exact input each feature network's protocol specifies.

Input: ``frames`` (N, T, 3, H, W), float RGB in [-1, 1] (real and generated frames both pass through
uint8 first, ``x / 127.5 - 1``, as video files would). Output: (N, 3, T', S, S), the 3D nets' layout.

Protocols (:data:`PROTOCOLS`; the README's metric table says the same):

- ``fvd`` (FVD, both I3D formats): the WHOLE frame resized to 224 x 224 by bilinear interpolation
  without antialiasing, exactly as google-research's ``frechet_video_distance.py`` does it
  (TF1 ``tf.image.resize_bilinear``: ``align_corners=False``, ``half_pixel_centers=False``, i.e.
  output pixel j samples input position ``j * in / out``), values in [-1, 1], 16 frames. No crop: a
  2:1 Cityscapes frame is squeezed, not halved.
- ``i3d`` (FID-I3D) and ``resnext101`` (FID-ResNeXt), the paper's metrics: S = 224 and 112. The frame
  is either centre-cropped (``frame="crop"``, the default: short side resized to S with antialiased
  bilinear interpolation, what PIL's ``Image.resize(BILINEAR)`` in the nets' public pipelines does
  when it shrinks, then the central S x S) or squeezed whole (``frame="whole"``: the whole frame
  resized to S x S, antialiased). I3D takes [-1, 1]; ResNeXt takes the 0-255 scale minus
  kenshohara's per-channel mean ``KENSHOHARA_MEAN`` (his ``Normalize(mean, [1, 1, 1])``).

Temporal, all protocols: exactly ``num_frames`` frames (16). Longer clips keep their first 16; shorter
clips are padded by repeating their last frame (kenshohara's ``LoopPadding`` restarts the clip
instead, which would show a video network an artificial cut back to frame 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

CLIP_FRAMES = 16
KENSHOHARA_MEAN = (114.7748, 107.7354, 99.4750)
_RANGE_SLACK = 1e-3  # float rounding of tanh outputs and of uint8 -> [-1, 1] conversion

Frame = Literal["crop", "whole"]
FRAMES: tuple[Frame, ...] = ("crop", "whole")


@dataclass(frozen=True)
class Protocol:
    size: int  # S: the net's input is S x S
    resize: str  # "tf_bilinear" (no antialias, TF1 coordinates) or "antialiased" (torch bilinear, antialias)
    frame: Frame  # "whole" frame squeezed to S x S, or the central "crop" after resizing the short side
    scale: str  # "[-1, 1]" or "0-255 minus mean"


PROTOCOLS = {
    "fvd": Protocol(224, "tf_bilinear", "whole", "[-1, 1]"),
    "i3d": Protocol(224, "antialiased", "crop", "[-1, 1]"),
    "resnext101": Protocol(112, "antialiased", "crop", "0-255 minus mean"),
}
SIZES = {name: p.size for name, p in PROTOCOLS.items()}


def protocol(name: str, frame: Frame | None = None) -> Protocol:
    """The protocol of ``name`` (``fvd``, ``i3d``, ``resnext101``); ``frame`` overrides the FID ones'."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; valid names: {sorted(PROTOCOLS)}")
    p = PROTOCOLS[name]
    if frame is None or name == "fvd":
        return p
    if frame not in FRAMES:
        raise ValueError(f"eval.fid_frame: {frame!r} is not one of {list(FRAMES)}")
    return Protocol(p.size, p.resize, frame, p.scale)


def _check(frames: Tensor) -> None:
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


def tf_bilinear_matrix(size_in: int, size_out: int, dtype=torch.float32, device=None) -> Tensor:
    """(size_out, size_in) weights of TF1 ``resize_bilinear`` along one axis: output j samples input
    ``j * size_in / size_out`` (no half-pixel offset), the lower index floored, the upper clamped."""
    pos = torch.arange(size_out, dtype=torch.float64) * (size_in / size_out)
    lo = pos.floor().long().clamp(max=size_in - 1)
    hi = (lo + 1).clamp(max=size_in - 1)
    frac = pos - lo.double()
    m = torch.zeros(size_out, size_in, dtype=torch.float64)
    rows = torch.arange(size_out)
    m.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    m.index_put_((rows, hi), frac, accumulate=True)
    return m.to(dtype=dtype, device=device)


def resize_tf_bilinear(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): the whole frame, TF1 bilinear (see :func:`tf_bilinear_matrix`)."""
    h, w = images.shape[-2:]
    rows = tf_bilinear_matrix(h, size, images.dtype, images.device)
    cols = tf_bilinear_matrix(w, size, images.dtype, images.device)
    return rows @ images @ cols.T


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


def resize_whole(images: Tensor, size: int) -> Tensor:
    """(B, C, H, W) -> (B, C, size, size): the whole frame, antialiased bilinear."""
    if tuple(images.shape[-2:]) == (size, size):
        return images
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def spatial(images: Tensor, p: Protocol) -> Tensor:
    if p.resize == "tf_bilinear":
        return resize_tf_bilinear(images, p.size)
    return resize_center_crop(images, p.size) if p.frame == "crop" else resize_whole(images, p.size)


def preprocess_clips(frames: Tensor, net: str, num_frames: int | None = CLIP_FRAMES,
                     frame: Frame | None = None) -> Tensor:
    """(N, T, 3, H, W) in [-1, 1] -> (N, 3, T', S, S) by the protocol ``net`` (``fvd``, ``i3d``,
    ``resnext101``; module docstring); ``frame`` picks crop or whole frame for the FID protocols."""
    p = protocol(net, frame)
    _check(frames)
    x = fit_length(frames.float(), num_frames)
    n, t = x.shape[:2]
    x = spatial(x.reshape(n * t, *x.shape[2:]), p)
    if p.scale != "[-1, 1]":
        mean = torch.tensor(KENSHOHARA_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x + 1.0) * 127.5 - mean
    return x.reshape(n, t, 3, *x.shape[-2:]).permute(0, 2, 1, 3, 4).contiguous()
