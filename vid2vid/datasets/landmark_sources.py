"""What the landmark readers (face sketches, pose maps) share: crop windows, stem pairing, good-frame runs.

Both readers crop a window out of each frame and resize it, pair per-frame files by stem, and cut a
sequence around frames whose landmark file is bad (a gap must not join two frames that are not
consecutive). The dlib 68-point face layout lives here too: the face sketch draws it, and the pose map
draws OpenPose's 70-point face, whose first 68 points are the same.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vid2vid.datasets.labels import resize_image, resize_nearest
from vid2vid.datasets.sources import list_files

# dlib 68-point parts: (first, last + 1, closed). OpenPose's 70-point face uses the same first 68.
FACE_PARTS = {
    "jaw": (0, 17, False), "brow_right": (17, 22, False), "brow_left": (22, 27, False),
    "nose_bridge": (27, 31, False), "nose_base": (31, 36, False), "eye_right": (36, 42, True),
    "eye_left": (42, 48, True), "lips_outer": (48, 60, True), "lips_inner": (60, 68, True),
}


def crop_resize(img: np.ndarray, window: list[int], size: tuple[int, int], nearest: bool = False) -> np.ndarray:
    """Crop ``window`` out of ``img`` and resize it to ``size`` = (W, H) (area down / cubic up, or
    nearest for maps whose values must not blend)."""
    x0, y0, x1, y1 = window
    part = np.ascontiguousarray(img[y0:y1, x0:x1])
    return resize_nearest(part, size) if nearest else resize_image(part, size)


def to_window(points: np.ndarray, window: list[int], size: tuple[int, int]) -> np.ndarray:
    """Source-pixel points -> target-pixel points after cropping ``window`` and resizing to ``size``.

    Pixel centres map to pixel centres: ``u' = (u + 0.5 - x0) * W / (x1 - x0) - 0.5``.
    """
    x0, y0, x1, y1 = window
    w, h = size
    out = np.empty_like(points, dtype=np.float32)
    out[..., 0] = (points[..., 0] + 0.5 - x0) * w / (x1 - x0) - 0.5
    out[..., 1] = (points[..., 1] + 0.5 - y0) * h / (y1 - y0) - 0.5
    return out


def files_by_stem(folder: Path, exts: set[str]) -> dict[str, Path]:
    """``stem -> file`` of ``folder`` (empty when the folder does not exist)."""
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in list_files(folder, exts)}


def good_runs(ok: list[bool]) -> list[tuple[int, int]]:
    """``[start, stop)`` of each maximal run of True in ``ok``."""
    runs, start = [], None
    for i, good in enumerate([*ok, False]):
        if good and start is None:
            start = i
        elif not good and start is not None:
            runs.append((start, i))
            start = None
    return runs


def run_name(seq: str, run: tuple[int, int], total: int) -> str:
    """A sequence keeps its name when nothing was cut out of it; a run is named by its first frame."""
    return seq if run == (0, total) else f"{seq}-f{run[0]:05d}"
