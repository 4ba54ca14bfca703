"""Pose->body: DensePose maps + OpenPose JSON per frame -> the paper's concatenated pose source.

Layout (imaginaire's, as in the shared sample; one split per prepared folder)::

    <root>/pose_maps-densepose/<seq>/<stem>.png    DensePose IUV as RGB: (U, V, part index I in 0..24)
    <root>/poses-openpose/<seq>/<stem>.json        OpenPose output ({"people": [{"pose_keypoints_2d", ...}]})
    <root>/images/<seq>/<stem>.jpg|png             real frames; without images/ the split is labels-only
    <root>/human_instance_maps/<seq>/<stem>.png    optional instance ids

Files are paired by stem. The source map has ``input_nc = 6`` channels ("we extract human poses with
DensePose and OpenPose, and directly concatenate the results", paper Sec. 4), uint8 0..255 in the
shards, [0, 1] for the model:

- 0..2: DensePose U, V and the part index scaled by 255/24 (the reference's scaling), resized nearest
  (blending part indices or UV across part borders would invent body parts),
- 3..5: the OpenPose skeleton drawn in colour at the target resolution (body limbs, face, hands).

An OpenPose file that is empty, malformed (wrong number of values), non-finite or shows no person is a
reject naming the file and reason; the sequence is cut around that frame and the runs on either side
are prepared. DensePose maps are checked when decoded (RGB, part index <= 24, same size as the frame).

Crop (the reference's ``randomScaleHeight_and_scaledCrop``, done here on the full-resolution source,
so the ground-truth flow is then estimated on exactly the pixels the model trains on): the window has
the target aspect ratio and, at zoom 1, the full frame height. For the ``train`` split each shard draws
a zoom in ``[1, MAX_ZOOM]`` (the reference's loadSize / fineSize = 1.5), a horizontal position around the
dancer (Gaussian, like the reference's crop_x) and a vertical position; the draw is seeded by
``data.seed``, the sequence and the shard's first frame, so re-runs reproduce it. Other splits use the
zoom-1 window centred on the dancer, the same for the whole sequence (long-video generation needs that).
"""

from __future__ import annotations

import json
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from vid2vid.datasets.labels import BadInput, compact_instances
from vid2vid.datasets.landmark_sources import FACE_PARTS, crop_resize, files_by_stem, good_runs, run_name, to_window
from vid2vid.datasets.sources import (
    IMAGE_EXTS,
    FrameBlock,
    Listing,
    Reject,
    SequenceSpec,
    Source,
    check_size,
    decode_image,
    header_size,
    list_subdirs,
    load_image,
    single_split,
)

DENSEPOSE, OPENPOSE, IMAGES, INSTANCES = "pose_maps-densepose", "poses-openpose", "images", "human_instance_maps"
NUM_PARTS = 24  # DensePose body parts; 0 is background
MAX_ZOOM = 1.5
CONF_BODY, CONF_DETAIL = 0.05, 0.2  # OpenPose confidence below which a point counts as missing

BODY_25 = [(1, 8), (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (8, 9), (9, 10), (10, 11), (8, 12), (12, 13),
           (13, 14), (1, 0), (0, 15), (15, 17), (0, 16), (16, 18), (14, 19), (19, 20), (14, 21), (11, 22),
           (22, 23), (11, 24)]
COCO_18 = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
           (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
LIMBS = {25: BODY_25, 18: COCO_18}
FINGERS = [list(range(0, 5)), [0, *range(5, 9)], [0, *range(9, 13)], [0, *range(13, 17)], [0, *range(17, 21)]]
SIZES = {"pose_keypoints_2d": (75, 54), "face_keypoints_2d": (210,), "hand_left_keypoints_2d": (63,),
         "hand_right_keypoints_2d": (63,)}


@dataclass
class Person:
    """One OpenPose detection; arrays are (K, 3) = (x, y, confidence) in source pixels, None if absent."""

    body: np.ndarray
    face: np.ndarray | None = None
    hand_left: np.ndarray | None = None
    hand_right: np.ndarray | None = None

    def centre(self) -> np.ndarray | None:
        pts = self.body[self.body[:, 2] > CONF_BODY, :2]
        return pts.mean(0) if len(pts) else None


# ------------------------------------------------------------------------------------------------
# reading


def read_openpose(path: str | Path, frame: int | None = None) -> list[Person]:
    """The people of one OpenPose JSON file; :class:`BadInput` (file + reason) for a bad file."""
    path = str(path)
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(path, f"unreadable OpenPose file: {err}", frame) from None
    if not text.strip():
        raise BadInput(path, "empty JSON file", frame)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise BadInput(path, f"not valid JSON: {err}", frame) from None
    if not isinstance(data, dict) or not data:
        raise BadInput(path, "empty JSON: no 'people' list" if not data else
                       f"wrong shape: expected an object with 'people', got {type(data).__name__}", frame)
    if "people" not in data:
        raise BadInput(path, f"no 'people' list (keys: {sorted(data)[:8]})", frame)
    if not isinstance(data["people"], list):
        raise BadInput(path, f"wrong shape: 'people' is a {type(data['people']).__name__}, expected a list", frame)
    people = []
    for i, entry in enumerate(data["people"]):
        if not isinstance(entry, dict):
            raise BadInput(path, f"wrong shape: person {i} is a {type(entry).__name__}, expected an object", frame)
        arrays = {}
        for key, sizes in SIZES.items():
            try:
                arr = np.asarray(entry.get(key) or [], dtype=np.float64).reshape(-1)
            except (ValueError, TypeError):
                raise BadInput(path, f"wrong shape: person {i} {key} is not a flat list of numbers", frame) from None
            if arr.size and arr.size not in sizes or (arr.size == 0 and key == "pose_keypoints_2d"):
                want = " or ".join(f"{n} ({n // 3} points)" for n in sizes)
                raise BadInput(path, f"wrong shape: person {i} {key} has {arr.size} values, expected {want} "
                                     "as (x, y, confidence) per point", frame)
            if not np.isfinite(arr).all():
                raise BadInput(path, f"missing points: non-finite values in person {i} {key}", frame)
            arrays[key] = arr.reshape(-1, 3) if arr.size else None
        people.append(Person(arrays["pose_keypoints_2d"], arrays["face_keypoints_2d"],
                             arrays["hand_left_keypoints_2d"], arrays["hand_right_keypoints_2d"]))
    if not any(p.centre() is not None for p in people):
        raise BadInput(path, f"missing points: no person with a body keypoint of confidence > {CONF_BODY} "
                             f"({len(people)} people listed)", frame)
    return people


def main_person(people: list[Person]) -> Person:
    """The detection with the most confident body points (the dancer, not a passer-by)."""
    return max(people, key=lambda p: int((p.body[:, 2] > CONF_BODY).sum()))


def read_densepose(path: str, frame: int) -> np.ndarray:
    """(H, W, 3) uint8 IUV map; rejects maps that are not RGB or hold a part index above 24."""
    iuv = load_image(path, frame, ("RGB", "RGBA"), "DensePose map", "an RGB IUV map (U, V, part index)",
                     convert="RGB")
    top = int(iuv[..., 2].max()) if iuv.size else 0
    if top > NUM_PARTS:
        raise BadInput(path, f"DensePose part index {top} > {NUM_PARTS} in the third channel: not an IUV map", frame)
    return iuv


# ------------------------------------------------------------------------------------------------
# rendering


def _hue_colours(n: int, value: int = 255) -> list[tuple[int, int, int]]:
    hsv = np.stack([np.linspace(0, 179, n, endpoint=False), np.full(n, 255), np.full(n, value)], -1)
    rgb = cv2.cvtColor(hsv.astype(np.uint8)[None], cv2.COLOR_HSV2RGB)[0]
    return [tuple(int(c) for c in col) for col in rgb]


def _segments(canvas: np.ndarray, pts: np.ndarray, pairs, colours, conf: float, thickness: int) -> None:
    for (a, b), colour in zip(pairs, colours, strict=True):
        if pts[a, 2] > conf and pts[b, 2] > conf:
            p, q = np.round(pts[[a, b], :2]).astype(np.int32)
            cv2.line(canvas, tuple(int(v) for v in p), tuple(int(v) for v in q), colour, thickness, cv2.LINE_8)


def render_openpose(people: list[Person], window: list[int], size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 skeletons of ``people`` (source pixels) inside crop ``window``, resized to ``size``.

    Drawn at the target resolution (lines scale with the height: 1 px per 128 rows for the body) so a
    1024-row model does not get hair-thin limbs and a 64-row one does not get blobs.
    """
    w, h = size
    canvas = np.zeros((h, w, 3), np.uint8)
    body_t, detail_t = max(1, round(h / 128)), max(1, round(h / 512))

    def moved(a: np.ndarray) -> np.ndarray:
        out = a.copy()
        out[:, :2] = to_window(a[:, :2], window, size)
        return out

    for person in people:
        pairs = LIMBS[len(person.body)]
        _segments(canvas, moved(person.body), pairs, _hue_colours(len(pairs)), CONF_BODY, body_t)
        if person.face is not None:
            face = moved(person.face)
            pairs = [(i, i + 1) for first, stop, _ in FACE_PARTS.values() for i in range(first, stop - 1)]
            pairs += [(stop - 1, first) for first, stop, closed in FACE_PARTS.values() if closed]
            _segments(canvas, face, pairs, [(255, 255, 255)] * len(pairs), CONF_DETAIL, detail_t)
        for hand in (person.hand_left, person.hand_right):
            if hand is not None:
                pairs = [(f[i], f[i + 1]) for f in FINGERS for i in range(len(f) - 1)]
                colours = [c for c in _hue_colours(len(FINGERS), 200) for _ in range(4)]
                _segments(canvas, moved(hand), pairs, colours, CONF_DETAIL, detail_t)
    return canvas


def densepose_channels(iuv: np.ndarray) -> np.ndarray:
    """U, V as stored and the part index scaled to 0..255 (x 255/24), so every channel spans [0, 1]."""
    out = iuv.copy()
    out[..., 2] = np.round(iuv[..., 2].astype(np.float32) * (255.0 / NUM_PARTS)).astype(np.uint8)
    return out


# ------------------------------------------------------------------------------------------------
# crop windows


def crop_window(src: tuple[int, int], size: tuple[int, int], centre: tuple[float, float],
                rng: np.random.Generator | None = None) -> list[int]:
    """``[x0, y0, x1, y1]`` of the target aspect inside a ``src`` = (W, H) frame.

    Zoom 1 is the largest such window (full height for a portrait target on a landscape video), centred
    on ``centre`` (the dancer) and clamped into the frame. With ``rng`` (training): zoom uniform in
    ``[1, MAX_ZOOM]``, x Gaussian around the dancer (std one sixth of the window width), y uniform.
    """
    sw, sh = src
    aspect = size[0] / size[1]
    base_w = min(float(sw), sh * aspect)
    zoom = 1.0 if rng is None else float(rng.uniform(1.0, MAX_ZOOM))
    ww, wh = base_w / zoom, base_w / aspect / zoom
    cx = centre[0] + (0.0 if rng is None else float(rng.normal(0.0, ww / 6)))
    x0 = min(max(cx - ww / 2, 0.0), sw - ww)
    y0 = float(rng.uniform(0.0, sh - wh)) if rng is not None else min(max(centre[1] - wh / 2, 0.0), sh - wh)
    x0, y0 = int(round(x0)), int(round(y0))
    return [x0, y0, min(sw, x0 + int(round(ww))), min(sh, y0 + int(round(wh)))]


def shard_rng(seed: int, sequence: str, start: int) -> np.random.Generator:
    """The augmentation draw of one shard: fixed by the data seed, the sequence and its first frame."""
    return np.random.default_rng([seed, zlib.crc32(sequence.encode()), start])


# ------------------------------------------------------------------------------------------------
# the source


class PoseMaps(Source):
    kind = "pose"
    label_nc = 0
    input_nc = 6
    labels_doc = ("pose (T,H,W,6) 0..255: DensePose U, V, part index x255/24; OpenPose skeleton in colour "
                  "(RGB)")

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        split = single_split(self.cfg.split)
        if not (root / DENSEPOSE).is_dir() or not (root / OPENPOSE).is_dir():
            return Listing([], [Reject(str(root), f"pose layout needs {DENSEPOSE}/ and {OPENPOSE}/", split=split)])
        dirs, rejects = list_subdirs(root / DENSEPOSE)
        for r in rejects:
            r.split = split
        seqs = []
        for d in dirs:
            try:
                seqs += self._list_one(split, root, d.name, rejects)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
        return Listing(seqs, rejects)

    def _list_one(self, split: str, root: Path, name: str, rejects: list[Reject]) -> list[SequenceSpec]:
        dense = files_by_stem(root / DENSEPOSE / name, IMAGE_EXTS)
        if not dense:
            raise BadInput(str(root / DENSEPOSE / name), "empty folder: no DensePose maps")
        poses = files_by_stem(root / OPENPOSE / name, {".json"})
        with_frames = (root / IMAGES).is_dir()  # one answer per split: shards of a split share columns
        if with_frames and not (root / IMAGES / name).is_dir():
            raise BadInput(str(root / IMAGES / name), f"missing frames folder for sequence {name}")
        images = files_by_stem(root / IMAGES / name, IMAGE_EXTS) if with_frames else {}
        insts = files_by_stem(root / INSTANCES / name, IMAGE_EXTS)
        stems = sorted(dense)
        centres, ok = [], []
        for i, stem in enumerate(stems):
            try:
                if stem not in poses:
                    raise BadInput(str(root / OPENPOSE / name / f"{stem}.json"), "missing OpenPose file", i)
                if with_frames and stem not in images:
                    raise BadInput(str(root / IMAGES / name / stem), "missing frame for the DensePose map "
                                   f"{dense[stem].name}", i)
                centres.append(main_person(read_openpose(poses[stem], i)).centre())
                ok.append(True)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
                centres.append(None)
                ok.append(False)
        src = header_size(str(dense[stems[0]]), 0)
        specs = []
        for a, b in good_runs(ok):
            run = stems[a:b]
            centre = np.median(np.stack(centres[a:b]), axis=0)
            specs.append(SequenceSpec(
                split=split, name=run_name(name, (a, b), len(stems)), num_frames=b - a,
                labels=[str(dense[s]) for s in run], frames=[str(images[s]) for s in run] if with_frames else [],
                instances=[str(insts[s]) for s in run] if all(s in insts for s in run) else [],
                has_frames=with_frames,
                params={"openpose": [str(poses[s]) for s in run], "source_size": list(src),
                        "centre": [float(c) for c in centre], "offset": a}))
        return specs

    def window(self, spec: SequenceSpec, start: int) -> list[int]:
        rng = shard_rng(self.cfg.seed, spec.name, start) if spec.split == "train" else None
        return crop_window(tuple(spec.params["source_size"]), self.size, tuple(spec.params["centre"]), rng)

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        src, offset = tuple(spec.params["source_size"]), spec.params["offset"]
        window = self.window(spec, start)
        out: dict[str, list[np.ndarray]] = {"labels": [], "instances": [], "frames": []}
        decode_s = resize_s = 0.0
        for t in range(start, stop):
            i = offset + t
            t0 = time.perf_counter()
            iuv = read_densepose(spec.labels[t], i)
            check_size(iuv, src, spec.labels[t], i, "DensePose map")
            people = read_openpose(spec.params["openpose"][t], i)
            rgb = decode_image(spec.frames[t], i, "rgb") if spec.frames else None
            if rgb is not None:
                check_size(rgb, src, spec.frames[t], i, "frame (vs its DensePose map)")
            inst = compact_instances(decode_image(spec.instances[t], i, "instance"), spec.instances[t], i) \
                if spec.instances else None
            t1 = time.perf_counter()
            dense = densepose_channels(crop_resize(iuv, window, self.size, nearest=True))
            out["labels"].append(np.concatenate([dense, render_openpose(people, window, self.size)], -1))
            if rgb is not None:
                out["frames"].append(crop_resize(rgb, window, self.size))
            if inst is not None:
                check_size(inst, src, spec.instances[t], i, "instance map")
                out["instances"].append(crop_resize(inst, window, self.size, nearest=True))
            decode_s += t1 - t0
            resize_s += time.perf_counter() - t1
        labels = np.stack(out["labels"])
        instances = np.stack(out["instances"]) if out["instances"] else np.zeros(labels.shape[:3], np.uint8)
        frames = np.stack(out["frames"]) if out["frames"] else None
        return FrameBlock(labels, instances, frames, decode_s=decode_s, resize_s=resize_s)
