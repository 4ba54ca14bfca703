"""Label-side transforms of the prepare step: resizing, instance boundaries, Canny edges, validation.

Everything here is plain numpy/OpenCV on uint8 arrays so it runs the same in a Ray task, a test or a
notebook. Label and instance maps are resized with nearest-neighbour sampling at pixel centres, so a
resized map only ever holds ids of the source map (no blended, meaningless ids at class borders).
"""

from __future__ import annotations

import cv2
import numpy as np

from vid2vid.errors import UserError


class BadInput(UserError, ValueError):
    """One input (a file, or a frame of a video) cannot be prepared; the prepare run rejects it.

    ``path`` and ``frame`` (index inside its sequence, when known) land in the manifest's rejects.
    """

    def __init__(self, path: str, reason: str, frame: int | None = None):
        self.path = str(path)
        self.reason = reason
        self.frame = frame
        where = self.path if frame is None else f"{self.path} (frame {frame})"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):  # Ray pickles errors raised in its tasks: rebuild from the three fields
        return BadInput, (self.path, self.reason, self.frame)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of an HxW id map to ``size`` = (W, H), sampling the source at pixel centres.

    ``INTER_NEAREST_EXACT`` rather than ``INTER_NEAREST``: the latter samples at ``floor(x * scale)``,
    which shifts the map by half a source pixel per output pixel and drops the last row/column.
    """
    w, h = size
    if label.shape[:2] == (h, w):
        return label
    return cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST_EXACT)


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an HxWx3 uint8 image to ``size`` = (W, H): area averaging down, bicubic up.

    INTER_AREA is the alias-free choice for the large downscales of preparation (2048 -> 512);
    bicubic matches the reference loader when a source is smaller than the target.
    """
    w, h = size
    src_h, src_w = img.shape[:2]
    if (src_h, src_w) == (h, w):
        return img
    shrink = w <= src_w and h <= src_h
    return cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)


def instance_edges(inst: np.ndarray) -> np.ndarray:
    """Instance boundaries of an (..., H, W) id map: 1 where any 4-neighbour has a different id.

    Both pixels on either side of a boundary are marked (the reference's ``get_edges``), so a one
    pixel wide object keeps a visible outline after the generator's downsampling.
    """
    inst = np.asarray(inst)
    edge = np.zeros(inst.shape, dtype=bool)
    dx = inst[..., :, 1:] != inst[..., :, :-1]
    dy = inst[..., 1:, :] != inst[..., :-1, :]
    edge[..., :, 1:] |= dx
    edge[..., :, :-1] |= dx
    edge[..., 1:, :] |= dy
    edge[..., :-1, :] |= dy
    return edge.astype(np.uint8)


def canny_edges(frame: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """Canny edge map of an HxWx3 RGB uint8 frame as HxW uint8 in {0, 1} (edge->video source).

    Computed on the RESIZED frame so edges are one pixel wide at the training resolution (edges
    computed at full resolution and then downscaled would vanish or thicken).
    """
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return (cv2.Canny(gray, low, high) > 0).astype(np.uint8)


def compact_instances(inst: np.ndarray, path: str = "", frame: int | None = None) -> np.ndarray:
    """Map an instance-id map with ids above 255 (Cityscapes ``instanceIds``: 16-bit, ``label*1000+k``)
    to uint8 by ranking its distinct ids. Boundaries and per-instance pooling only need distinct ids,
    and the ranking is order-preserving, so nothing the model uses changes.
    """
    if inst.dtype == np.uint8:
        return inst
    if inst.size and inst.max() <= 255 and inst.min() >= 0:
        return inst.astype(np.uint8)
    ids, inverse = np.unique(inst, return_inverse=True)
    if len(ids) > 256:
        raise BadInput(path, f"{len(ids)} distinct instance ids; at most 256 fit the uint8 column", frame)
    return inverse.reshape(inst.shape).astype(np.uint8)


def validate_labels(label: np.ndarray, label_nc: int, path: str, frame: int | None = None) -> None:
    """Reject a label map holding an id >= ``label_nc`` (it would index past the one-hot channels).

    Checked on the source map, before resizing, so an offending id cannot hide by being resized away.
    """
    if label_nc <= 0:
        return
    top = int(label.max()) if label.size else 0
    if top >= label_nc:
        bad = np.unique(label[label >= label_nc])[:8].tolist()
        raise BadInput(path, f"label id {top} >= label_nc {label_nc} (offending ids {bad}); "
                             f"set data.label_nc or fix the label maps", frame)
