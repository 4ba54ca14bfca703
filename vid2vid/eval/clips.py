"""Validation clips for evaluation: which frames, read how, generated how.

Selection (:func:`plan_clips`) works on shard metadata only, on the driver. The split is ``val`` by
default (``eval.split``); shards without a ``val`` split are an error that says how to make one
(``data.val_source``, ``data.val_sequences``, ``data.val_fraction``), unless ``eval.split=train``
asks for training clips, which the service then tags. Shard clips are ``data.clip_len`` frames, the
protocol wants ``eval.clip_len`` (16): consecutive clips of one sequence are stitched into segments
of exactly that length (a 30-frame shard clip gives one 16-frame segment; 4-frame clips are joined
four at a time), never across a gap in the sequence. When no sequence has enough contiguous frames
the segments are as long as the longest run, and the plan says so. ``num_clips=0`` takes every
segment (the paper's protocol: all 500 Cityscapes validation clips); ``num_clips=N`` takes N evenly
spaced over all of them, so they cover every sequence. The choice is deterministic: real statistics
cached from one evaluation match the next one's.

Generation (:func:`generate_clip`) runs G sequentially from its no-previous-frame path, as at
inference. A multimodal model (``model.use_features``) takes per-object styles drawn from the
checkpoint's per-class mixtures (``styles.npz``, ``vid2vid fit-styles``) by default: feeding it E's
features of the real frames would hand it the real appearance. That reconstruction is available as
its own metric names (``eval.styles=real|both``, ``..._recon``).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import torch

from vid2vid.datasets.shards import MANIFEST, Clip, ShardError, load_manifest, shard_paths, table_to_numpy
from vid2vid.eval.temporal import warping_error

log = logging.getLogger("vid2vid.eval")

CLIP_COLUMNS = ["labels", "instance_edges", "instances", "frames", "flow", "confidence"]


@dataclass(frozen=True)
class Piece:
    """Frames ``[offset, offset + length)`` of the clip stored in row group ``row`` of ``path``."""

    path: str
    row: int
    offset: int
    length: int


@dataclass
class ClipPlan:
    split: str
    frames: int  # frames per segment (eval.clip_len unless the data is shorter)
    segments: list[list[Piece]]  # the selected clips, each a contiguous run of one sequence
    available: int  # segments of that length in the split (before the num_clips selection)


NO_VAL_ADVICE = ("prepare a validation split: data.val_source=<folder of validation videos>, "
                 "data.val_sequences=[names] or data.val_fraction=0.1 (sequences held out of training), then "
                 "prepare again with data.overwrite=true; or evaluate on training clips with eval.split=train "
                 "(tagged eval/on_training_clips)")


def choose_split(manifest: dict, requested: str = "val", where: str = MANIFEST) -> str:
    """``requested`` if the shards have it with real frames, else an error saying how to get one."""
    splits = manifest.get("splits", {})
    if splits.get(requested, {}).get("has_frames", False):
        return requested
    have = {k: ("frames" if v.get("has_frames") else "labels only") for k, v in splits.items()}
    if requested == "val":
        raise ShardError(f"{where}: no 'val' split with real frames to evaluate on (splits: {have}); {NO_VAL_ADVICE}")
    raise ShardError(f"{where}: no {requested!r} split with real frames (splits: {have}); evaluation compares "
                     f"generated clips with real ones")


def _clips_by_sequence(shards, split: str) -> dict[str, list[tuple[int, str, int]]]:
    """sequence -> [(start, path, row)] sorted by start, from the (tiny) sequence/start columns."""
    out: dict[str, list[tuple[int, str, int]]] = defaultdict(list)
    for path in shard_paths(shards, split):
        meta = pq.read_table(path, columns=["sequence", "start"])
        for row, (seq, start) in enumerate(zip(meta["sequence"].to_pylist(), meta["start"].to_pylist(),
                                               strict=True)):
            out[seq].append((int(start), str(path), row))
    return {seq: sorted(clips) for seq, clips in sorted(out.items())}


def _segments(by_seq: dict, clip_len: int, length: int) -> list[list[Piece]]:
    """Cut each sequence's contiguous frames into segments of ``length`` (leftovers dropped)."""
    segments = []
    for clips in by_seq.values():
        cur: list[Piece] = []
        have, end = 0, None
        for start, path, row in clips:
            if end is None or start > end:  # a gap: a segment never spans it
                cur, have, end = [], 0, start
            pos = end
            while pos < start + clip_len:
                n = min(start + clip_len - pos, length - have)
                cur.append(Piece(path, row, pos - start, n))
                have, pos = have + n, pos + n
                if have == length:
                    segments.append(cur)
                    cur, have = [], 0
            end = max(end, pos)
    return segments


def _longest_run(by_seq: dict, clip_len: int) -> int:
    best = 0
    for clips in by_seq.values():
        run_start, end = None, None
        for start, _, _ in clips:
            if end is None or start > end:
                run_start, end = start, start
            end = max(end, start + clip_len)
            best = max(best, end - run_start)
    return best


def plan_clips(shards, num_clips: int, clip_len: int, split: str = "val") -> ClipPlan:
    """The evaluation clips of ``shards`` (see module docstring); ``num_clips=0``: all of them."""
    if num_clips < 0 or clip_len < 1:
        raise ValueError(f"plan_clips: num_clips must be >= 0 (0 = all) and clip_len >= 1, got {num_clips}, "
                         f"{clip_len}")
    manifest = load_manifest(shards)
    split = choose_split(manifest, split, f"{shards}/{MANIFEST}")
    stored = int(manifest["clip_len"])
    by_seq = _clips_by_sequence(shards, split)
    length = min(clip_len, _longest_run(by_seq, stored))
    if length < 2:
        raise ShardError(f"{shards}/{MANIFEST}: split {split!r} has no clip of 2 or more frames to evaluate")
    if length < clip_len:
        log.warning("%s split %r: the longest contiguous run is %d frames, shorter than eval.clip_len=%d; "
                    "evaluating %d-frame clips (padded to the nets' 16 frames by repeating the last)",
                    shards, split, length, clip_len, length)
    segments = _segments(by_seq, stored, length)
    wanted = len(segments) if num_clips == 0 else min(num_clips, len(segments))
    picks = sorted({round(i) for i in np.linspace(0, len(segments) - 1, wanted)})
    return ClipPlan(split, length, [segments[i] for i in picks], len(segments))


def encode_segment(pieces: list[Piece]) -> str:
    return json.dumps([[p.path, p.row, p.offset, p.length] for p in pieces])


def read_segment(text: str) -> Clip:
    """A batch-of-one :class:`Clip` of the segment encoded by :func:`encode_segment`."""
    parts = []
    for path, row, offset, length in json.loads(text):
        table = pq.ParquetFile(path).read_row_group(int(row), columns=CLIP_COLUMNS)
        parts.append(Clip.from_batch(table_to_numpy(table)).slice(int(offset), int(length)))
    return Clip(**{f: torch.cat([getattr(p, f) for p in parts], dim=1) for f in CLIP_COLUMNS})


def stored_flow_valid(text: str) -> np.ndarray:
    """(T,) bool: frame t of the segment has the real flow to frame t-1 in the shards. False at t = 0
    and wherever a piece starts at a stored clip's first frame (prepare zeroes that flow)."""
    valid = []
    for _, _, offset, length in json.loads(text):
        valid += [int(offset) + j > 0 for j in range(int(length))]
    valid[0] = False
    return np.asarray(valid, bool)


def stack_clips(clips: list[Clip]) -> Clip:
    return Clip(**{f: torch.cat([getattr(c, f) for c in clips], dim=0) for f in CLIP_COLUMNS})


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """(N, T, 3, H, W) in [-1, 1] -> (N, T, H, W, 3) uint8, the shards' own frame encoding."""
    x = ((frames.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 1, 3, 4, 2).cpu().numpy()


def warp_terms(frames: torch.Tensor, clip: Clip, i: int) -> tuple[float, float]:
    """(warping error, its confidence mass) of clip ``i``: the mass weights clips in the overall mean,
    so the mean over clips equals :func:`warping_error` over all of them at once."""
    conf = clip.confidence[i : i + 1]
    mass = float(conf[:, 1:].sum()) * frames.shape[2]
    if mass <= 0:
        return 0.0, 0.0
    return warping_error(frames[i : i + 1], clip.flow[i : i + 1], conf), mass


def style_features(bank, clip: Clip, i: int, seed: int) -> torch.Tensor:
    """(1, T, feat_num, H, W): per-object styles for clip ``i``, drawn from ``bank`` (a StyleBank) with
    ``seed`` (an object keeps its draw in every frame, as in ``vid2vid generate style_seed=...``)."""
    from vid2vid.generate.styles import StyleSampler

    draw = StyleSampler(bank, seed=seed)
    labels, instances = clip.labels[i].numpy(), clip.instances[i].numpy()
    maps = [draw.features(labels[t], instances[t]) for t in range(labels.shape[0])]
    return torch.from_numpy(np.stack(maps))[None]


def generate_clip(gen, model_cfg, clip: Clip, features: torch.Tensor | None) -> torch.Tensor:
    """Generated frames (N, T, 3, H, W) in [-1, 1] for the clips' labels, from G's first-frame path."""
    from vid2vid.models.vid2vid import generate_sequence
    from vid2vid.training.inputs import clip_inputs

    prepared = clip_inputs(model_cfg, clip, clip.num_frames, features=features)
    return generate_sequence(gen, model_cfg, prepared.inputs).frames.float()
