"""Clip shards on disk: the Arrow schema, atomic Parquet writes, the manifest, and reading back.

One Parquet row is one clip of ``clip_len`` consecutive frames; one row group is one row, so a reader
can pull a single clip without decoding its neighbours. Tensor columns use Arrow's canonical
fixed-shape tensor extension type (``arrow.fixed_shape_tensor``), which Ray Data and plain pyarrow
both turn back into numpy arrays of the right shape:

==================  ========  ============  ==================================================
column              dtype     shape         meaning
==================  ========  ============  ==================================================
``labels``          uint8     (T,H,W)       label ids; for edge->video sources Canny edges 0/1
                              (T,H,W,C)     dense multi-channel sources (face, pose): 0..255
``instance_edges``  uint8     (T,H,W)       1 where a 4-neighbour has another instance id
``instances``       uint8     (T,H,W)       instance ids (for the feature encoder's pooling)
``frames``          uint8     (T,H,W,3)     RGB
``flow``            float16   (T,H,W,2)     BACKWARD flow: ``flow[t]`` maps frame t to t-1,
                                            ``warp(frames[t-1], flow[t]) ~ frames[t]``;
                                            ``flow[0] = 0`` (no previous frame in the clip)
``confidence``      uint8     (T,H,W)       1 where flow[t] passed forward-backward
                                            consistency (or is exact); ``confidence[0] = 0``
``sequence``        string                  source sequence name
``start``           int32                   index of the clip's first frame in its sequence
``clip_index``      int32                   index of the clip in its sequence
==================  ========  ============  ==================================================

Labels-only (inference) splits, such as the sample's ``test`` split that has no real frames, have no
``frames``, ``flow`` or ``confidence`` columns; the manifest says ``has_frames: false`` for them.
"""

from __future__ import annotations

import json
import os
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vid2vid import storage
from vid2vid.errors import UserError

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
SETTINGS_KEY = b"vid2vid.settings"  # Parquet key-value metadata: what a shard was prepared with

# column -> (numpy dtype, per-frame trailing dims)
TENSOR_COLUMNS = {
    "labels": (np.uint8, ()),
    "instance_edges": (np.uint8, ()),
    "instances": (np.uint8, ()),
    "frames": (np.uint8, (3,)),
    "flow": (np.float16, (2,)),
    "confidence": (np.uint8, ()),
}
FRAME_COLUMNS = ("frames", "flow", "confidence")


class ShardError(UserError, ValueError):
    """A shard folder or file is missing or inconsistent; the message names it."""


# ------------------------------------------------------------------------------------------------
# writing


def clips_table(columns: dict[str, np.ndarray], sequence: str, starts: list[int],
                clip_indices: list[int]) -> pa.Table:
    """Arrow table of N clips from stacked arrays ``columns[name]`` of shape (N, T, H, W, ...)."""
    n = len(starts)
    arrays, names = [], []
    for name, (dtype, _) in TENSOR_COLUMNS.items():
        if name not in columns:
            continue
        arr = np.ascontiguousarray(columns[name], dtype=dtype)
        if arr.shape[0] != n:
            raise ValueError(f"column {name}: {arr.shape[0]} clips, expected {n}")
        arrays.append(pa.FixedShapeTensorArray.from_numpy_ndarray(arr))
        names.append(name)
    arrays += [pa.array([sequence] * n, pa.string()), pa.array(starts, pa.int32()),
               pa.array(clip_indices, pa.int32())]
    names += ["sequence", "start", "clip_index"]
    return pa.Table.from_arrays(arrays, names=names)


# Tensors are stored as fixed-size lists: dictionary encoding and min/max statistics over millions of
# pixel values cost 3x the write time for nothing; zstd-1 then matches their size.
WRITE_OPTIONS = {"row_group_size": 1, "compression": "zstd", "compression_level": 1, "use_dictionary": False,
                 "write_statistics": False}


def write_shard(table: pa.Table, path: str | Path, settings: dict) -> None:
    """Write ``table`` to ``path`` (a local path or a URI, see :mod:`vid2vid.storage`) so that a reader
    (or a re-run deciding what to skip) sees either no shard or a complete one, never half a file from a
    killed task: locally through a temporary name in the same folder and ``os.replace`` (atomic within
    a folder); on an object store directly (an object appears only once its upload completed).
    """
    meta = dict(table.schema.metadata or {})
    meta[SETTINGS_KEY] = json.dumps(settings, sort_keys=True).encode()
    table = table.replace_schema_metadata(meta)
    if storage.is_remote(path):
        fs, key = storage.resolve(path)
        pq.write_table(table, key, filesystem=fs, **WRITE_OPTIONS)
        return
    path = Path(storage.resolve(path)[1])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        pq.write_table(table, tmp, **WRITE_OPTIONS)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def shard_complete(path: str | Path, rows: int, settings: dict) -> bool:
    """True when ``path`` is a finished shard of ``rows`` clips prepared with the same ``settings``."""
    try:
        meta = pq.read_metadata(str(path))
    except (OSError, pa.ArrowException):
        return False
    stored = (meta.metadata or {}).get(SETTINGS_KEY)
    return meta.num_rows == rows and stored is not None and json.loads(stored) == settings


def remove_temp_files(folder: str | Path) -> None:
    """Delete temporaries left by killed writers (they are never read)."""
    for p in storage.list_files(folder):
        if storage.name(p).startswith(".") and ".tmp-" in storage.name(p):
            storage.delete_file(p)


# ------------------------------------------------------------------------------------------------
# manifest


def write_manifest(out: str | Path, manifest: dict) -> str:
    """Write ``manifest.json`` whole (see :func:`vid2vid.storage.write_text`); returns its location."""
    path = storage.join(out, MANIFEST)
    storage.write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def check_model_fits(model, manifest: dict, shards: str | Path, advice: str | None = None) -> None:
    """The model must be built for the data's source channels: ``label_nc``, and ``input_nc`` for dense
    sources. ``advice`` ends the message (default: set the model key to the data's value)."""
    label_nc = int(manifest.get("label_nc", model.label_nc))
    if label_nc != model.label_nc:
        raise ValueError(f"{shards}/{MANIFEST}: label_nc is {label_nc} but model.label_nc is {model.label_nc}; "
                         f"{advice or f'set model.label_nc={label_nc}'}")
    input_nc = int(manifest.get("input_nc", 0))
    if label_nc == 0 and input_nc != model.input_nc:
        raise ValueError(f"{shards}/{MANIFEST}: input_nc is {input_nc} but model.input_nc is {model.input_nc}; "
                         f"{advice or f'set model.input_nc={input_nc}'}")


def load_manifest(out: str | Path) -> dict:
    """The ``manifest.json`` of a prepared folder; raises :class:`ShardError` naming what is wrong."""
    path = storage.join(out, MANIFEST)
    manifest = storage.read_json(path, ShardError(f"{path}: no manifest; prepare the data first "
                                                  f"(vid2vid prepare out={out})"))
    version = manifest.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {version}, this code reads {SCHEMA_VERSION}; "
                         "prepare the data again with overwrite=true")
    return manifest


def shard_paths(out: str | Path, split: str = "train") -> list[Path | str]:
    """Shard files of ``split`` listed by the manifest (not a glob: stale files are never read): paths
    for a folder, URIs (strings) when ``out`` is one; pyarrow's Parquet readers open both as they are."""
    manifest = load_manifest(out)
    if split not in manifest["splits"]:
        raise ShardError(f"{storage.join(out, MANIFEST)}: no split {split!r}; it has {sorted(manifest['splits'])}")
    paths = [storage.join(out, s["path"]) if storage.is_uri(out) else Path(out) / s["path"]
             for s in manifest["shards"] if s["split"] == split]
    for p in paths:
        if not storage.is_file(p):
            raise ShardError(f"{p}: listed in the manifest but missing; prepare again")
    return paths


# ------------------------------------------------------------------------------------------------
# reading


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    """Columns of a clip table as numpy: tensors (N, T, ...), ``sequence`` as an object array."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if isinstance(col.type, pa.FixedShapeTensorType):
            out[name] = col.to_numpy_ndarray()
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def _read_rows(batch: dict[str, np.ndarray], columns: list[str] | None) -> pa.Table:
    """Ray Data map: (path, row) references -> the referenced clips, one row group each."""
    tables = []
    for path, row in zip(batch["path"], batch["row"], strict=True):
        tables.append(pq.ParquetFile(str(path)).read_row_group(int(row), columns=columns))
    return pa.concat_tables(tables)


def training_dataset(out: str | Path, split: str = "train", shuffle_seed: int | None = None,
                     shuffle: bool = True, columns: list[str] | None = None):
    """Streaming Ray Dataset of the clips of ``split``, shuffled by clip.

    The dataset is built from tiny (file, row group) references that are shuffled first, then each
    reference is read by a map task: a full shuffle by clip without an all-to-all over the (large)
    clip rows. ``shuffle_seed=None`` reshuffles on every execution (every epoch); a seed fixes the
    order. Ray Train splits it across workers when passed as ``datasets={"train": ds}``.
    ``columns`` defaults to every numeric column: ``iter_torch_batches`` cannot carry strings, so
    ``sequence`` is left out unless asked for.
    """
    import ray.data

    manifest = load_manifest(out)
    if not manifest["splits"].get(split, {}).get("has_frames", False) and split in manifest["splits"]:
        raise ShardError(f"{storage.join(out, MANIFEST)}: split {split!r} has no real frames (labels only, "
                         "for inference); it cannot be used for training")
    refs = []
    for path in shard_paths(out, split):
        rows = pq.read_metadata(path).num_row_groups
        refs += [{"path": str(path), "row": r} for r in range(rows)]
    if not refs:
        raise ShardError(f"{out}: split {split!r} has no clips")
    if columns is None:
        columns = [c for c in pq.read_schema(refs[0]["path"]).names if c != "sequence"]
    if shuffle and shuffle_seed is not None:
        # A fixed order is shuffled here, on the driver: the references are tiny, and Ray Data's
        # all-to-all random_shuffle costs seconds of task start-up before the first batch.
        random.Random(shuffle_seed).shuffle(refs)
    ds = ray.data.from_items(refs)
    if shuffle and shuffle_seed is None:
        ds = ds.random_shuffle()  # a new order on every execution (every epoch)
    ds = ds.map_batches(_read_rows, batch_size=1, batch_format="numpy", fn_kwargs={"columns": columns})
    if shuffle_seed is not None or not shuffle:
        # a fixed order must survive parallel reads, which otherwise finish (and yield) in any order
        ds.context.execution_options.preserve_order = True
    return ds


def iter_clips(out: str | Path, split: str = "train"):
    """Every clip of ``split`` in manifest order as a batch-of-one :class:`Clip`, without Ray."""
    for path in shard_paths(out, split):
        f = pq.ParquetFile(path)
        for r in range(f.num_row_groups):
            yield Clip.from_batch(table_to_numpy(f.read_row_group(r)))


@dataclass
class Clip:
    """A batch of clips as torch tensors in the layout the model uses (time before channels).

    labels (B,T,H,W) long (dense sources: (B,T,C,H,W) float in [0, 1]), instance_edges (B,T,H,W) float,
    instances (B,T,H,W) long,
    frames (B,T,3,H,W) float in [-1, 1], flow (B,T,2,H,W) float32 (backward, ``flow[:, 0] = 0``),
    confidence (B,T,1,H,W) float; the last three are None for labels-only splits.
    """

    labels: object
    instance_edges: object
    instances: object
    frames: object = None
    flow: object = None
    confidence: object = None
    start: object = None  # (B,) first frame of each clip in its sequence
    clip_index: object = None
    sequence: list[str] | None = None

    @classmethod
    def from_batch(cls, batch: dict) -> Clip:
        """Convert what ``iter_torch_batches`` (torch) or ``iter_batches``/:func:`table_to_numpy`
        (numpy) yields; channel-last shard arrays become channel-first tensors."""
        import torch

        def t(name, dtype):
            v = batch.get(name)
            if v is None:
                return None
            if torch.is_tensor(v):
                return v.to(torch.float32 if dtype is np.float32 else torch.int64)
            # astype copies into a writable array: Arrow hands out read-only views
            return torch.from_numpy(np.asarray(v).astype(dtype))

        if batch.get("labels") is None:
            raise KeyError(f"batch has no 'labels' column; columns: {sorted(batch)}")
        frames, flow, conf = t("frames", np.float32), t("flow", np.float32), t("confidence", np.float32)
        seq = batch.get("sequence")
        labels = t("labels", np.int64)
        if labels.dim() == 5:  # dense (B,T,H,W,C) uint8 codes -> the model's (B,T,C,H,W) in [0, 1]
            labels = labels.permute(0, 1, 4, 2, 3).float().div(255.0)
        return cls(
            labels=labels,
            instance_edges=t("instance_edges", np.float32),
            instances=t("instances", np.int64),
            frames=None if frames is None else frames.permute(0, 1, 4, 2, 3).div(127.5).sub(1.0),
            flow=None if flow is None else flow.permute(0, 1, 4, 2, 3),
            confidence=None if conf is None else conf.unsqueeze(2),
            start=t("start", np.int64),
            clip_index=t("clip_index", np.int64),
            sequence=None if seq is None else [str(s) for s in seq],
        )

    @property
    def num_frames(self) -> int:
        return int(self.labels.shape[1])

    def slice(self, start: int, length: int) -> Clip:
        """Frames ``[start, start + length)`` of every clip (views, no copy).

        For ``start > 0`` the slice's first flow is kept: it is the real flow to the frame just before
        the slice, which a train loop continuing from a previous chunk can use; a loop treating the
        slice as a fresh clip ignores index 0 anyway.
        """
        if start < 0 or length < 1 or start + length > self.num_frames:
            raise ValueError(f"Clip.slice({start}, {length}) is outside a clip of {self.num_frames} frames")
        sl = slice(start, start + length)

        def cut(x):
            return None if x is None else x[:, sl]

        return Clip(cut(self.labels), cut(self.instance_edges), cut(self.instances), cut(self.frames),
                    cut(self.flow), cut(self.confidence), None if self.start is None else self.start + start,
                    self.clip_index, self.sequence)

    def to(self, device) -> Clip:
        def mv(x):
            return x.to(device) if hasattr(x, "to") else x

        return Clip(*(mv(getattr(self, f)) for f in ("labels", "instance_edges", "instances", "frames",
                                                       "flow", "confidence", "start", "clip_index")),
                    sequence=self.sequence)
