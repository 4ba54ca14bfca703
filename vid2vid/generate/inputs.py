"""Streaming readers of generation inputs: a folder of label maps, a video file, or prepared shards.

Each reader yields one :class:`SourceFrame` at a time, already at the model's resolution, and never
holds more than one frame (a video: one 16-frame decode chunk; shards: one clip), so a sequence of any
length streams through in constant memory. Bad input fails with :class:`BadInput`, which names the
file and the frame.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vid2vid.datasets.labels import (
    BadInput,
    canny_edges,
    instance_edges,
    resize_image,
    resize_nearest,
    validate_labels,
)
from vid2vid.datasets.sources import IMAGE_EXTS, VIDEO_EXTS, decode_image
from vid2vid.storage import is_remote


@dataclass
class SourceFrame:
    """One source frame at the model's resolution.

    ``labels``: (H, W) uint8 ids for a semantic model, or (input_nc, H, W) float32 for a dense one
    (edges). ``instances``: (H, W) int64 object ids; ``(class, instance)`` identifies an object for
    style sampling. ``from_labels``: no instance maps were given, so the instances ARE the labels
    (one object per class) and follow any relabelling.
    """

    labels: np.ndarray
    instances: np.ndarray
    instance_edges: np.ndarray
    name: str
    from_labels: bool = False

    def relabeled(self, lut: np.ndarray) -> SourceFrame:
        labels = lut[self.labels]
        if not self.from_labels:
            return SourceFrame(labels, self.instances, self.instance_edges, self.name)
        inst = labels.astype(np.int64)
        return SourceFrame(labels, inst, instance_edges(inst), self.name, True)


def frame_from_labels(labels: np.ndarray, name: str) -> SourceFrame:
    inst = labels.astype(np.int64)
    return SourceFrame(labels, inst, instance_edges(inst), name, from_labels=True)


def _resize_ids(ids: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of an id map of any integer width (OpenCV has no int64 resize)."""
    if ids.dtype == np.uint8:
        return resize_nearest(ids, size)
    return resize_nearest(ids.astype(np.int32), size).astype(np.int64)


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


class LabelFolder:
    """A folder of label-id maps (one image per frame, sorted by name), optionally instance maps.

    Without ``instance_dir`` the vid2vid layout's sibling is used when it exists
    (``test_A/<seq>`` -> ``test_inst/<seq>``); otherwise each class is one object.
    """

    def __init__(self, folder: str | Path, size: tuple[int, int], label_nc: int,
                 instance_dir: str | Path | None = None):
        self.folder, self.size, self.label_nc = Path(folder), size, label_nc
        self.labels = _images(self.folder)
        if not self.labels:
            hint = " (a vid2vid root? give one sequence folder, e.g. test_A/<seq>)" if any(
                p.is_dir() for p in self.folder.iterdir()) else ""
            raise BadInput(str(self.folder), f"no label images ({', '.join(sorted(IMAGE_EXTS))}){hint}")
        if instance_dir is None:
            parent = self.folder.parent
            sibling = parent.with_name(parent.name[:-2] + "_inst") / self.folder.name
            instance_dir = sibling if parent.name.endswith("_A") and sibling.is_dir() else None
        self.instances: list[Path] = []
        if instance_dir is not None:
            self.instances = _images(Path(instance_dir))
            if len(self.instances) != len(self.labels):
                raise BadInput(str(instance_dir), f"{len(self.instances)} instance maps for "
                                                  f"{len(self.labels)} label maps in {self.folder}")

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[SourceFrame]:
        for t, path in enumerate(self.labels):
            raw = decode_image(str(path), t, "label")
            # Validated BEFORE resizing, so an out-of-range id cannot be resized away.
            validate_labels(raw, self.label_nc, str(path), t)
            labels = resize_nearest(raw, self.size)
            if not self.instances:
                yield frame_from_labels(labels, path.name)
                continue
            ipath = self.instances[t]
            inst = decode_image(str(ipath), t, "instance")
            if inst.shape != raw.shape:
                raise BadInput(str(ipath), f"instance map is {inst.shape[1]}x{inst.shape[0]} but its label map "
                                           f"{path.name} is {raw.shape[1]}x{raw.shape[0]}", t)
            inst = _resize_ids(inst.astype(np.int64), self.size)
            yield SourceFrame(labels, inst, instance_edges(inst), path.name)


class VideoEdges:
    """A video file as the edge->video source: Canny edges of each resized frame, (1, H, W) in {0, 1},
    computed exactly as the prepare step does for training (same thresholds, from the checkpoint)."""

    CHUNK = 16  # frames per decord call: bounds memory at the video's native resolution

    def __init__(self, path: str | Path, size: tuple[int, int], canny_low: int = 100, canny_high: int = 200):
        import decord

        self.path, self.size, self.low, self.high = Path(path), size, canny_low, canny_high
        try:
            self._vr = decord.VideoReader(str(self.path), ctx=decord.cpu(0), num_threads=1)
        except Exception as err:
            raise BadInput(str(self.path), f"cannot open video: {type(err).__name__}: {str(err)[:200]}") from None
        self._n = len(self._vr)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[SourceFrame]:
        zeros = np.zeros(self.size[::-1], np.int64)
        for a in range(0, self._n, self.CHUNK):
            idx = list(range(a, min(a + self.CHUNK, self._n)))
            try:
                chunk = self._vr.get_batch(idx).asnumpy()
            except Exception as err:
                raise BadInput(str(self.path), f"cannot decode frames {idx[0]}..{idx[-1]}: "
                                               f"{type(err).__name__}: {str(err)[:200]}", a) from None
            for t, frame in zip(idx, chunk, strict=True):
                edges = canny_edges(resize_image(frame, self.size), self.low, self.high)
                yield SourceFrame(edges[None].astype(np.float32), zeros, zeros.astype(np.uint8),
                                  f"{self.path.name}#{t}")


class ShardFrames:
    """One sequence of a prepared shard folder, clip by clip in frame order (overlaps skipped).

    Label ids, edge maps (video sources) and dense multi-channel codes (face, pose) are all read.

    ``split`` defaults to ``test`` when the manifest has it, else its first split; ``sequence`` to the
    first sequence of that split in manifest order.
    """

    def __init__(self, folder: str | Path, size: tuple[int, int], label_nc: int, split: str | None = None,
                 sequence: str | None = None):
        import pyarrow.parquet as pq

        from vid2vid.datasets.shards import load_manifest, shard_paths

        self.folder, self.size, self.label_nc = Path(folder), size, label_nc
        manifest = load_manifest(folder)
        self.dense = manifest.get("label_nc", 1) == 0
        if self.dense != (label_nc == 0):
            raise BadInput(str(folder), f"shards hold {'edge maps' if self.dense else 'label ids'} but the model "
                                        f"takes {'a dense source' if label_nc == 0 else 'label ids'}")
        splits = list(manifest["splits"])
        self.split = split or ("test" if "test" in splits else splits[0])
        rows: dict[str, list[tuple[int, Path, int]]] = {}
        for path in shard_paths(folder, self.split):
            meta = pq.read_table(path, columns=["sequence", "start"])
            for r, (seq, start) in enumerate(zip(meta["sequence"].to_pylist(), meta["start"].to_pylist(),
                                                 strict=True)):
                rows.setdefault(seq, []).append((start, path, r))
        if not rows:
            raise BadInput(str(folder), f"split {self.split!r} has no clips")
        self.sequence = sequence or next(iter(rows))
        if self.sequence not in rows:
            raise BadInput(str(folder), f"split {self.split!r} has no sequence {self.sequence!r}; "
                                        f"it has {sorted(rows)}")
        self.clips = sorted(rows[self.sequence])
        clip_len = int(manifest.get("clip_len", 0)) or None
        self._n = max(s for s, _, _ in self.clips) + (clip_len or 0)

    def __len__(self) -> int:
        return self._n

    def __iter__(self) -> Iterator[SourceFrame]:
        import pyarrow.parquet as pq

        from vid2vid.datasets.shards import table_to_numpy

        cols = ["labels", "instances", "instance_edges"]
        done = 0  # next frame index of the sequence to emit
        for start, path, row in self.clips:
            clip = table_to_numpy(pq.ParquetFile(path).read_row_group(row, columns=cols))
            for k in range(clip["labels"].shape[1]):
                t = start + k
                if t < done:
                    continue  # overlapping clips (clip_stride < clip_len): already emitted
                done = t + 1
                yield self._frame(clip, k, f"{path.name}#{t}", path, t)

    def _frame(self, clip: dict, k: int, name: str, path: Path, t: int) -> SourceFrame:
        labels, inst = clip["labels"][0, k], clip["instances"][0, k].astype(np.int64)
        edges = clip["instance_edges"][0, k]
        if not self.dense:
            validate_labels(labels, self.label_nc, str(path), t)
        if labels.shape != self.size[::-1]:  # nearest: ids stay ids, edge maps stay 0/1
            labels, inst = resize_nearest(labels, self.size), _resize_ids(inst, self.size)
            edges = instance_edges(inst)
        if self.dense:  # edges (H,W) 0/1 as they are; face/pose codes (H,W,C) uint8 -> [0, 1], as in training
            labels = (labels[None].astype(np.float32) if labels.ndim == 2
                      else labels.transpose(2, 0, 1).astype(np.float32) / 255.0)
        return SourceFrame(labels, inst, edges, name)


def open_input(path: str | Path, size: tuple[int, int], label_nc: int, input_nc: int = 0, *,
               instance_dir: str | None = None, split: str | None = None, sequence: str | None = None,
               canny: tuple[int, int] = (100, 200)):
    """The reader for ``path``: shards (a folder with ``manifest.json``), a video file, or a label folder."""
    if is_remote(path):
        raise BadInput(str(path), "generation reads local files: download the input first")
    p = Path(path)
    if not p.exists():
        raise BadInput(str(p), "input does not exist")
    if p.is_dir() and (p / "manifest.json").is_file():
        return ShardFrames(p, size, label_nc, split, sequence)
    if p.is_file():
        if p.suffix.lower() not in VIDEO_EXTS:
            raise BadInput(str(p), f"input file is not a video ({', '.join(sorted(VIDEO_EXTS))})")
        if label_nc != 0 or input_nc != 1:
            raise BadInput(str(p), "a video input becomes Canny edges, which only an edge->video model "
                                   f"(model.label_nc 0, input_nc 1) takes; this model has label_nc {label_nc}, "
                                   f"input_nc {input_nc}")
        return VideoEdges(p, size, *canny)
    if label_nc == 0:
        raise BadInput(str(p), "this model takes a dense source (label_nc 0): give a video or edge shards, "
                               "not a label folder")
    return LabelFolder(p, size, label_nc, instance_dir)
