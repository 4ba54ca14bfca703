"""Face crops for the optional face discriminator of pose->body (the reference's ``--add_face_disc``).

The head is found in the pose source itself: channel 2 holds the DensePose part index scaled to
[0, 1] (part / 24, see ``vid2vid.datasets.pose``), and parts 23 and 24 are the head. Each frame gets
its own square crop centred on its head's bounding box (the reference used one box for the whole
batch), of side ``face_crop`` x frame height (1/4: 128 px at 512 rows, the reference's
``fineSize // 32 * 8``), moved inside the frame at the borders. A frame without head pixels has no
crop; :func:`face_boxes` says which frames have one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

PART_CHANNEL = 2  # DensePose part index / 24 in the pose source
NUM_PARTS = 24
HEAD_PARTS = (23, 24)


@dataclass
class FaceBoxes:
    top_left: Tensor  # (B, 2) long: row, column of each crop's top-left pixel
    side: int  # crop side in pixels
    found: Tensor  # (B,) bool: the frame shows head pixels (frames without are not judged)


def crop_side(height: int, fraction: float) -> int:
    """Even crop side, at least 8 px, at most the frame height."""
    return min(height, max(8, int(round(height * fraction / 2)) * 2))


def face_boxes(sources: Tensor, fraction: float) -> FaceBoxes:
    """Per-frame face squares from pose sources ``(B, C, H, W)`` (C >= 3, the pose layout)."""
    if sources.dim() != 4 or sources.shape[1] <= PART_CHANNEL:
        raise ValueError(f"face_boxes: expected pose sources (B, C>={PART_CHANNEL + 1}, H, W), "
                         f"got {tuple(sources.shape)}")
    b, _, h, w = sources.shape
    side = min(crop_side(h, fraction), w)
    part = torch.round(sources[:, PART_CHANNEL].float() * NUM_PARTS)
    head = (part >= HEAD_PARTS[0]) & (part <= HEAD_PARTS[1])
    rows, cols = head.any(dim=2), head.any(dim=1)  # (B, H), (B, W)

    def centre(mask: Tensor, size: int) -> Tensor:
        index = torch.arange(size, device=mask.device).expand_as(mask)
        first = torch.where(mask, index, size).amin(dim=1)
        last = torch.where(mask, index, -1).amax(dim=1)
        return (first + last) // 2

    top = (centre(rows, h) - side // 2).clamp(0, h - side)
    left = (centre(cols, w) - side // 2).clamp(0, w - side)
    return FaceBoxes(torch.stack([top, left], dim=1), side, rows.any(dim=1))


def crop(images: Tensor, boxes: FaceBoxes) -> Tensor:
    """``(B, C, H, W)`` -> ``(B, C, side, side)``: each image's own square (differentiable)."""
    if images.shape[0] != boxes.top_left.shape[0]:
        raise ValueError(f"crop: {images.shape[0]} images but {boxes.top_left.shape[0]} boxes")
    steps = torch.arange(boxes.side, device=images.device)
    rows = boxes.top_left[:, 0, None] + steps  # (B, side)
    cols = boxes.top_left[:, 1, None] + steps
    batch = torch.arange(images.shape[0], device=images.device)[:, None, None]
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
