"""One reader per data source: list its sequences (cheap, on the driver), read frame ranges (in Ray tasks).

Sources (``DataConfig.source_kind``; ``auto`` detects from the path, see :func:`detect_kind`):

- ``vid2vid``: ``<root>/<split>_A/<seq>/`` label maps, ``<split>_B/<seq>/`` RGB frames,
  ``<split>_inst/<seq>/`` instance maps (optional), files paired in sorted order as in the reference.
  A split without ``_B`` (the sample's ``test``) is labels-only: inference clips without frames/flow.
- ``cityscapes``: ``<root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
  plus a parallel label folder (``DataConfig.cityscapes_label_dir``) holding one ``*labelIds.png`` per
  frame, and optionally ``*instanceIds.png`` (same folder or ``cityscapes_instance_dir``). Files are
  matched by the ``<city>_<seq>_<frame>`` key; a sequence is one ``<city>_<seq>`` snippet.
- ``video``: a video file or a folder of them, decoded with decord; the source (label) is the Canny edge
  map of each resized frame, 0/1 (edge->video: ``label_nc 0, input_nc 1``), instances are all zero.
- ``synthetic``: street scenes from :mod:`vid2vid.datasets.synthetic` with their EXACT flow.
- ``face`` / ``pose``: dense multi-channel sources (face sketches from landmarks, DensePose + OpenPose),
  read by :mod:`vid2vid.datasets.face` and :mod:`vid2vid.datasets.pose`, imported on first use.

``DataConfig.split`` names the split(s) to prepare: ``train``, ``train,test`` or ``all`` (every
``<split>_A`` / ``leftImg8bit_sequence/<split>`` found). Video and synthetic sources have no split
folders: all their sequences go to the one split named (``all`` means ``train``).

Listing never decodes pixels (only headers), so it stays fast on the driver; everything that needs
pixels fails inside :meth:`Source.read` with a :class:`BadInput` naming the file and frame.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vid2vid.datasets.labels import (
    BadInput,
    canny_edges,
    compact_instances,
    resize_image,
    resize_nearest,
    validate_labels,
)

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
VIDEO_EXTS = {".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv"}
SOURCE_KINDS = ("synthetic", "vid2vid", "cityscapes", "video", "face", "pose")


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


def _files(folder: Path, exts: set[str]) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and not p.name.startswith("."))
    except OSError as err:
        raise BadInput(str(folder), f"unreadable path: {err.strerror or err}") from None


def _subdirs(folder: Path) -> tuple[list[Path], list[Reject]]:
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


def _splits(requested: str, available: list[str]) -> list[str]:
    if requested in ("all", "*"):
        return available
    return [s.strip() for s in requested.split(",") if s.strip()]


_UNREADABLE = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def _single_split(requested: str) -> str:
    """Video and synthetic sources have no split folders: everything goes to ``data.split``."""
    if requested in ("all", "*"):
        return "train"
    splits = _splits(requested, [])
    if len(splits) != 1:
        raise ValueError(f"data.split: this source has no split folders; give one split name, got {requested!r}")
    return splits[0]


def _header_size(path: str, frame: int) -> tuple[int, int]:
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


def _check_size(arr: np.ndarray, expected: tuple[int, int], path: str, frame: int, what: str) -> None:
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
                sizes[what] = _header_size(paths[0], 0)
        for t in range(start, stop):
            for what, paths, kind in (("labels", spec.labels, "label"),
                                      ("instances", spec.instances, "instance"),
                                      ("frames", spec.frames, "rgb")):
                if not paths:
                    continue
                t0 = time.perf_counter()
                arr = decode_image(paths[t], t, kind)
                _check_size(arr, sizes[what], paths[t], t, what[:-1])
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


class Vid2VidFolders(ImageFolderSource):
    kind = "vid2vid"

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        seqs, rejects = [], []
        available = sorted(p.name[:-2] for p in root.glob("*_A") if p.is_dir())
        for split in _splits(self.cfg.split, available):
            first = len(rejects)
            a_dir, b_dir, i_dir = (root / f"{split}_{s}" for s in ("A", "B", "inst"))
            if not a_dir.is_dir():
                rejects.append(Reject(str(a_dir), f"no label folder for split {split!r}; found splits "
                                                  f"{available}"))
                continue
            dirs, bad = _subdirs(a_dir)
            rejects += bad
            if not dirs and not bad:
                rejects.append(Reject(str(a_dir), "empty folder: no sequence sub-folders"))
            for d in dirs:
                try:
                    seqs.append(self._list_one(split, d, b_dir, i_dir))
                except BadInput as err:
                    rejects.append(Reject.from_error(err))
            for r in rejects[first:]:
                r.split = split
        return Listing(seqs, rejects)

    def _list_one(self, split: str, a_seq: Path, b_dir: Path, i_dir: Path) -> SequenceSpec:
        labels = _files(a_seq, IMAGE_EXTS)
        if not labels:
            raise BadInput(str(a_seq), "empty folder: no label maps")
        streams = {}
        for what, parent in (("frames", b_dir), ("instances", i_dir)):
            if not parent.is_dir():  # no <split>_B: inference split; no <split>_inst: no instances
                streams[what] = []
                continue
            folder = parent / a_seq.name
            if not folder.is_dir():
                raise BadInput(str(folder), f"missing {what} folder for sequence {a_seq.name}")
            files = _files(folder, IMAGE_EXTS)
            if len(files) != len(labels):
                raise BadInput(str(folder), f"label/{what} count mismatch: {len(labels)} label maps in "
                                            f"{a_seq} but {len(files)} {what}")
            streams[what] = files
        return self._spec(split, a_seq.name, labels, streams["frames"], streams["instances"])


_CS_KEY = re.compile(r"^([^_]+_\d+_\d+)_")


class CityscapesRaw(ImageFolderSource):
    kind = "cityscapes"
    FRAMES = "leftImg8bit_sequence"

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        frame_root = root / self.FRAMES
        label_root = root / self.cfg.cityscapes_label_dir
        inst_root = root / (self.cfg.cityscapes_instance_dir or self.cfg.cityscapes_label_dir)
        seqs, rejects = [], []
        available = sorted(p.name for p in frame_root.iterdir() if p.is_dir()) if frame_root.is_dir() else []
        if not label_root.is_dir():
            return Listing([], [Reject(str(label_root), "label folder not found (data.cityscapes_label_dir)")])
        for split in _splits(self.cfg.split, available):
            first = len(rejects)
            cities, bad = _subdirs(frame_root / split)
            rejects += bad
            if not cities and not bad:
                rejects.append(Reject(str(frame_root / split), "empty folder: no city sub-folders"))
            for city in cities:
                try:
                    seqs += self._list_city(split, city, label_root / split / city.name,
                                            inst_root / split / city.name, rejects)
                except BadInput as err:
                    rejects.append(Reject.from_error(err))
            for r in rejects[first:]:
                r.split = split
        return Listing(seqs, rejects)

    @staticmethod
    def _by_key(folder: Path, suffix: str) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        out = {}
        for p in _files(folder, IMAGE_EXTS):
            m = _CS_KEY.match(p.name)
            if m and p.name.endswith(suffix):
                out[m.group(1)] = p
        return out

    def _list_city(self, split, city: Path, label_dir: Path, inst_dir: Path, rejects) -> list[SequenceSpec]:
        frames = self._by_key(city, "_leftImg8bit.png")
        if not frames:
            raise BadInput(str(city), "empty folder: no *_leftImg8bit.png frames")
        labels = self._by_key(label_dir, "labelIds.png")
        insts = self._by_key(inst_dir, "instanceIds.png")
        groups: dict[str, list[str]] = {}
        for key in frames:
            groups.setdefault(key.rsplit("_", 1)[0], []).append(key)
        specs = []
        for name, keys in sorted(groups.items()):
            keys.sort(key=lambda k: int(k.rsplit("_", 1)[1]))
            missing = [k for k in keys if k not in labels]
            if missing:
                rejects.append(Reject(str(frames[missing[0]]), f"label/frame count mismatch: {len(missing)} of "
                                      f"{len(keys)} frames of {name} have no *labelIds.png in {label_dir}"))
                continue
            use_inst = bool(insts) and all(k in insts for k in keys)
            specs.append(self._spec(split, name, [labels[k] for k in keys], [frames[k] for k in keys],
                                    [insts[k] for k in keys] if use_inst else []))
        return specs


class VideoFiles(Source):
    kind = "video"
    label_nc = 0
    input_nc = 1
    CHUNK = 16  # frames decoded per decord call: bounds memory at full source resolution

    def list(self) -> Listing:
        path = Path(self.cfg.source)
        split = _single_split(self.cfg.split)
        try:
            files = [path] if path.is_file() else _files(path, VIDEO_EXTS)
        except BadInput as err:
            return Listing([], [Reject.from_error(err, split)])
        if not files:
            return Listing([], [Reject(str(path), "empty folder: no video files "
                                                  f"({', '.join(sorted(VIDEO_EXTS))})", split=split)])
        seqs, rejects, names = [], [], set()
        for f in files:
            try:
                vr = self._open(str(f))
                n = len(vr)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
                continue
            name = f.stem if f.stem not in names else f"{f.stem}_{f.suffix[1:]}"
            names.add(name)
            seqs.append(SequenceSpec(split=split, name=name, num_frames=n, video=str(f)))
        return Listing(seqs, rejects)

    @staticmethod
    def _open(path: str):
        import decord

        try:
            # One decoder thread: Ray already runs one task per CPU.
            return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as err:
            raise BadInput(path, f"cannot open video: {type(err).__name__}: {str(err)[:200]}") from None

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        vr = self._open(spec.video)
        frames, decode_s, resize_s = [], 0.0, 0.0
        for a in range(start, stop, self.CHUNK):
            b = min(a + self.CHUNK, stop)
            t0 = time.perf_counter()
            try:
                # Decode at the native size and resize here: decord's own resize returns 4 or 6
                # channels for some widths (STACK.md).
                chunk = vr.get_batch(list(range(a, b))).asnumpy()
            except Exception as err:
                raise BadInput(spec.video, f"cannot decode frames {a}..{b - 1} (truncated or corrupt "
                                           f"video?): {type(err).__name__}: {str(err)[:200]}", a) from None
            t1 = time.perf_counter()
            frames += [resize_image(f, self.size) for f in chunk]
            decode_s += t1 - t0
            resize_s += time.perf_counter() - t1
        frames = np.stack(frames)
        edges = np.stack([canny_edges(f, self.cfg.canny_low, self.cfg.canny_high) for f in frames])
        return FrameBlock(edges, np.zeros_like(edges), frames, decode_s=decode_s, resize_s=resize_s)


class SyntheticScenes(Source):
    kind = "synthetic"

    def list(self) -> Listing:
        split = _single_split(self.cfg.split)
        seqs = []
        for i in range(self.cfg.synthetic_sequences):
            # Same per-sequence seed and name as synthetic.make_dataset, so shards can be checked
            # against it, yet each sequence is generated independently inside its own Ray task.
            seed = int(np.random.SeedSequence([self.cfg.seed, i]).generate_state(1)[0])
            seqs.append(SequenceSpec(split=split, name=f"synthetic_{self.cfg.seed}_{i:04d}",
                                     num_frames=self.cfg.synthetic_frames, seed=seed))
        for i in range(self.cfg.synthetic_val_sequences):  # unseen scenes from their own seed stream
            seed = int(np.random.SeedSequence([self.cfg.seed, i, 1]).generate_state(1)[0])
            seqs.append(SequenceSpec(split="val", name=f"synthetic_{self.cfg.seed}_val_{i:04d}",
                                     num_frames=self.cfg.synthetic_frames, seed=seed))
        return Listing(seqs, [])

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        from vid2vid.datasets.synthetic import make_sequence

        t0 = time.perf_counter()
        w, h = self.size
        # The whole scene is rendered: its layout depends on the sequence length (camera margins).
        seq = make_sequence(spec.num_frames, w, h, spec.seed)
        sl = slice(start, stop)
        return FrameBlock(seq.labels[sl], seq.instances[sl], seq.frames[sl], seq.flow[sl],
                          seq.valid[sl].astype(np.uint8), decode_s=time.perf_counter() - t0)


class _Sources(dict):
    """kind -> Source class. The face and pose readers live in their own modules (they build on this
    one), so they are imported on first lookup instead of here, which would be a circular import."""

    LAZY = {"face": ("vid2vid.datasets.face", "FaceSketches"), "pose": ("vid2vid.datasets.pose", "PoseMaps")}

    def __missing__(self, kind: str) -> type:
        if kind not in self.LAZY:
            raise KeyError(kind)
        import importlib

        module, name = self.LAZY[kind]
        self[kind] = cls = getattr(importlib.import_module(module), name)
        return cls


SOURCES = _Sources({"vid2vid": Vid2VidFolders, "cityscapes": CityscapesRaw, "video": VideoFiles,
                    "synthetic": SyntheticScenes})


def detect_kind(source: str) -> str:
    """Which reader a ``source`` path needs; raises ``FileNotFoundError``/``ValueError`` naming it."""
    if source == "synthetic":
        return "synthetic"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist (or is unreadable)")
    if path.is_file():
        if path.suffix.lower() in VIDEO_EXTS:
            return "video"
        raise ValueError(f"data source {source!r} is a file but not a video ({', '.join(sorted(VIDEO_EXTS))})")
    if (path / CityscapesRaw.FRAMES).is_dir():
        return "cityscapes"
    if any((path / d).is_dir() for d in ("pose_maps-densepose", "poses-openpose")):
        return "pose"
    if any((path / d).is_dir() for d in ("landmarks-dlib68", "landmarks")):
        return "face"
    if any(p.is_dir() for p in path.glob("*_A")):
        return "vid2vid"
    if any(p.suffix.lower() in VIDEO_EXTS for p in path.iterdir()):
        return "video"
    raise ValueError(f"cannot tell the layout of {source!r}: expected <split>_A/ folders (vid2vid), "
                     f"{CityscapesRaw.FRAMES}/ (raw Cityscapes), landmarks-dlib68/ (face), "
                     "pose_maps-densepose/ (pose) or video files; set data.source_kind")


def make_source(cfg) -> Source:
    kind = detect_kind(cfg.source) if cfg.source_kind == "auto" else cfg.source_kind
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data.source_kind {kind!r}; choose one of {SOURCE_KINDS}")
    return SOURCES[kind](cfg)
