"""What every source reader shares: the listing and frame-block types, the base readers, file helpers.

A reader lists its sequences (cheap, on the driver) and reads frame ranges (in Ray tasks). The readers
themselves live in :mod:`vid2vid.datasets.readers` (vid2vid folders, Cityscapes, video files, synthetic
scenes), :mod:`vid2vid.datasets.face` and :mod:`vid2vid.datasets.pose`; :mod:`vid2vid.datasets.registry`
maps ``data.source_kind`` to them. This module imports none of them, so each can build on it.

Listing never decodes pixels (only headers), so it stays fast on the driver; everything that needs
pixels fails inside :meth:`Source.read` with a :class:`BadInput` naming the file and frame.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vid2vid.datasets.labels import (
    BadInput,
    compact_instances,
    resize_image,
    resize_nearest,
    validate_labels,
)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}


@dataclass
class Reject:
    """An input that was not prepared, as it appears in ``manifest.json``."""

    path: str
    reason: str
    frame: int | None = None
    split: str | None = None

    @classmethod
    def from_error(cls, err: BadInput, split: str | None = None) -> Reject:
        return cls(err.path, err.reason, err.frame, split)

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class SequenceSpec:
    """What listing found for one sequence; travels (pickled) to the Ray tasks that read it."""

    split: str
    name: str
    num_frames: int
    labels: list[str] = field(default_factory=list)  # one label map per frame (image sources)
    frames: list[str] = field(default_factory=list)  # one RGB image per frame; empty = labels only
    instances: list[str] = field(default_factory=list)  # one instance map per frame; empty = none
    video: str | None = None
    seed: int | None = None  # synthetic scenes
    has_frames: bool = True
    params: dict = field(default_factory=dict)  # source-specific, JSON-able (e.g. a crop window)


@dataclass
class Listing:
    sequences: list[SequenceSpec]
    rejects: list[Reject]


@dataclass
class FrameBlock:
    """Frames ``[start, stop)`` of one sequence, decoded and resized to the target (W, H)."""

    labels: np.ndarray  # (T,H,W) uint8 label ids, or 0/1 edges for edge->video
    instances: np.ndarray  # (T,H,W) uint8 instance ids (zeros when the source has none)
    frames: np.ndarray | None  # (T,H,W,3) uint8 RGB; None for labels-only (inference) splits
    flow: np.ndarray | None = None  # (T,H,W,2) float32 exact backward flow (synthetic only)
    confidence: np.ndarray | None = None  # (T,H,W) {0,1} where the exact flow is valid
    decode_s: float = 0.0
    resize_s: float = 0.0


# ------------------------------------------------------------------------------------------------
# helpers


def list_files(folder: Path, exts: set[str]) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and not p.name.startswith("."))
    except OSError as err:
        raise BadInput(str(folder), f"unreadable path: {err.strerror or err}") from None


def list_subdirs(folder: Path) -> tuple[list[Path], list[Reject]]:
    """Sub-folders of ``folder``; broken links and unreadable entries become rejects, not silence."""
    dirs, rejects = [], []
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        return [], [Reject(str(folder), f"unreadable path: {err.strerror or err}")]
    for p in entries:
        if p.is_symlink() and not p.exists():
            rejects.append(Reject(str(p), "unreadable path: broken symbolic link"))
        elif p.is_dir():
            dirs.append(p)
    return dirs, rejects


def requested_splits(requested: str, available: list[str]) -> list[str]:
    if requested in ("all", "*"):
        return available
    return [s.strip() for s in requested.split(",") if s.strip()]


_UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def single_split(requested: str) -> str:
    """Video and synthetic sources have no split folders: everything goes to ``data.split``."""
    if requested in ("all", "*"):
        return "train"
    splits = requested_splits(requested, [])
    if len(splits) != 1:
        raise ValueError(f"data.split: this source has no split folders; give one split name, got {requested!r}")
    return splits[0]


def header_size(path: str, frame: int) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except _UNREADABLE as err:
        raise BadInput(path, f"unreadable path: {type(err).__name__}: {err.strerror}", frame) from None
    except Exception as err:  # PIL raises several unrelated types for undecodable files
        raise BadInput(path, f"cannot read image header: {err}", frame) from None


def load_image(path: str, frame: int, modes: tuple[str, ...] | None, what: str, expected: str,
               convert: str | None = None) -> np.ndarray:
    """Fully decode one file (PIL is strict: truncated or corrupt data raises, never half an image);
    any failure, or a mode outside ``modes``, is a :class:`BadInput` naming the file and frame."""
    try:
        with Image.open(path) as im:
            im.load()
            if modes is not None and im.mode not in modes:
                raise BadInput(path, f"{what} has mode {im.mode}; expected {expected}", frame)
            return np.asarray(im.convert(convert) if convert else im)
    except BadInput:
        raise
    except _UNREADABLE as err:
        raise BadInput(path, f"unreadable path: {type(err).__name__}: {err.strerror}", frame) from None
    except Exception as err:
        raise BadInput(path, f"cannot decode image: {type(err).__name__}: {err}", frame) from None


def decode_image(path: str, frame: int, kind: str) -> np.ndarray:
    """``kind``: ``rgb`` -> HxWx3 uint8; ``label`` -> HxW uint8 ids; ``instance`` -> HxW ids (any int)."""
    if kind == "rgb":
        return load_image(path, frame, None, "image", "", convert="RGB")
    arr = load_image(path, frame, ("L", "P", "I", "I;16", "I;16B", "I;16L", "1"), f"{kind} map",
                     "single-channel ids (e.g. Cityscapes labelIds, not the colour images)")
    if kind == "label" and arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise BadInput(path, f"label ids up to {arr.max()} do not fit uint8", frame)
        arr = arr.astype(np.uint8)
    return arr


def check_size(arr: np.ndarray, expected: tuple[int, int], path: str, frame: int, what: str) -> None:
    w, h = expected
    if arr.shape[:2] != (h, w):
        raise BadInput(path, f"{what} size changed inside the sequence: {arr.shape[1]}x{arr.shape[0]}, "
                             f"the sequence's first {what} is {w}x{h}", frame)


# ------------------------------------------------------------------------------------------------
# sources


class Source:
    """Base class: ``list()`` finds sequences on the driver, ``read()`` decodes a frame range."""

    kind = ""
    label_nc = 35
    input_nc = 0

    def __init__(self, cfg):
        self.cfg = cfg
        self.size = cfg.size

    def list(self) -> Listing:
        raise NotImplementedError

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        raise NotImplementedError


class ImageFolderSource(Source):
    """Shared reader of per-frame image files (both folder layouts); subclasses only list."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.label_nc = cfg.label_nc

    def _spec(self, split: str, name: str, labels: list[Path], frames: list[Path],
              instances: list[Path]) -> SequenceSpec:
        return SequenceSpec(split=split, name=name, num_frames=len(labels),
                            labels=[str(p) for p in labels], frames=[str(p) for p in frames],
                            instances=[str(p) for p in instances], has_frames=bool(frames))

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        decode_s = resize_s = 0.0
        sizes: dict[str, tuple[int, int]] = {}
        out: dict[str, list[np.ndarray]] = {"labels": [], "instances": [], "frames": []}
        # The reference size of each stream is the sequence's FIRST file (read from its header), so
        # a size change is caught even when it falls on a shard boundary.
        for what, paths in (("labels", spec.labels), ("instances", spec.instances), ("frames", spec.frames)):
            if paths:
                sizes[what] = header_size(paths[0], 0)
        for t in range(start, stop):
            for what, paths, kind in (("labels", spec.labels, "label"),
                                      ("instances", spec.instances, "instance"),
                                      ("frames", spec.frames, "rgb")):
                if not paths:
                    continue
                t0 = time.perf_counter()
                arr = decode_image(paths[t], t, kind)
                check_size(arr, sizes[what], paths[t], t, what[:-1])
                if kind == "label":
                    validate_labels(arr, self.label_nc, paths[t], t)
                elif kind == "instance":
                    arr = compact_instances(arr, paths[t], t)
                t1 = time.perf_counter()
                arr = resize_image(arr, self.size) if kind == "rgb" else resize_nearest(arr, self.size)
                decode_s += t1 - t0
                resize_s += time.perf_counter() - t1
                out[what].append(arr)
        labels = np.stack(out["labels"])
        instances = np.stack(out["instances"]) if out["instances"] else np.zeros_like(labels)
        frames = np.stack(out["frames"]) if out["frames"] else None
        return FrameBlock(labels, instances, frames, decode_s=decode_s, resize_s=resize_s)
