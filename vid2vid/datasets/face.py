"""Edge->face: 68-point dlib landmarks per frame -> the face-sketch source of the paper's face videos.

Layout (imaginaire's, as in the shared sample; one split per prepared folder, like video sources)::

    <root>/images/<seq>/<stem>.jpg|png                        real frames
    <root>/landmarks-dlib68/<seq>/<stem>.json|txt|npy         68 (x, y) points in the frame's pixels

Landmarks are paired with frames by file stem. JSON holds ``[[x, y], ...]`` (68 pairs, or 136 flat
numbers), ``.txt`` 68 lines of ``x y`` or ``x,y``, ``.npy`` a (68, 2) array. A landmark file that is
missing, empty or malformed is a reject naming the file and reason; the sequence is cut around that
frame and the runs of good frames on either side are prepared (a gap must not join two frames that are
not consecutive, or flow and D_V would see a jump).

The source map (paper, Sec. 4: "landmarks are connected to create the face sketch; for background, we
extract Canny edges outside the face regions") has ``input_nc = 3`` channels, uint8 0..255 in the
shards, [0, 1] for the model:

0. facial parts as 1-pixel polylines (jaw, brows, nose, eyes, lips) drawn at the target resolution,
1. Canny edges of the frame outside the face region (landmark hull extended over the forehead),
2. distance to the sketch, 255 on a line falling to 0 at ``H / 16`` pixels: a 1-pixel line vanishes
   in the generator's first downsamplings, a distance ramp does not (the reference's distance maps).

Frames are cropped to a window around the face, fixed per sequence (a window that moved between clips
would break long-video generation), of ``FACE_CROP`` times the sequence's landmark box, then resized.
Landmark extraction (:func:`extract_landmarks`) is optional and needs a detector the user installs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from vid2vid.datasets.labels import BadInput, canny_edges
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
    list_files,
    list_subdirs,
    single_split,
)

LANDMARK_DIRS = ("landmarks-dlib68", "landmarks")
LANDMARK_EXTS = {".json", ".txt", ".npy"}
NUM_POINTS = 68
FACE_CROP = 2.0  # crop window side / larger side of the sequence's landmark box (hair, neck, motion)
FOREHEAD = 0.5  # forehead height / brow-to-chin height, to close the face region above the brows
DIST_FRACTION = 1 / 16  # the distance channel reaches 0 at this fraction of the image height


# ------------------------------------------------------------------------------------------------
# landmarks


def read_landmarks(path: str | Path, frame: int | None = None) -> np.ndarray:
    """(68, 2) float32 landmarks from a ``.json``, ``.txt`` or ``.npy`` file; :class:`BadInput` if not."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            data = np.load(path, allow_pickle=False)
        else:
            text = path.read_text()
            if not text.strip():
                raise BadInput(str(path), "empty landmark file", frame)
            if path.suffix == ".json":
                data = json.loads(text)
                if isinstance(data, dict):  # tolerate {"landmarks": [...]}
                    data = data.get("landmarks", data.get("points", []))
                if not data:
                    raise BadInput(str(path), "empty JSON: no landmarks", frame)
            else:
                data = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
        pts = np.asarray(data, dtype=np.float64)
    except BadInput:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise BadInput(str(path), f"unreadable landmark file: {err}", frame) from None
    except json.JSONDecodeError as err:
        raise BadInput(str(path), f"not valid JSON: {err}", frame) from None
    except (ValueError, TypeError) as err:  # ragged rows, nulls, strings
        raise BadInput(str(path), f"landmarks are not a numeric (68, 2) array: {err}", frame) from None
    if pts.ndim == 1 and pts.size == 2 * NUM_POINTS:
        pts = pts.reshape(NUM_POINTS, 2)
    if pts.shape != (NUM_POINTS, 2):
        got = f"{pts.shape[0]} points" if pts.ndim == 2 and pts.shape[1] == 2 else f"shape {pts.shape}"
        raise BadInput(str(path), f"wrong shape: expected {NUM_POINTS} (x, y) points, got {got}", frame)
    if not np.isfinite(pts).all():
        raise BadInput(str(path), "missing points: non-finite (NaN/inf) coordinates", frame)
    return pts.astype(np.float32)


def face_region(points: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 {0, 1} mask of the face: hull of the landmarks and of the jaw mirrored upwards.

    dlib's points stop at the brows; mirroring the jaw about the brow line (scaled by ``FOREHEAD``)
    adds the forehead, so hairline edges stay background edges and forehead wrinkles do not.
    """
    w, h = size
    brow_y = points[17:27, 1].mean()
    jaw = points[0:17].copy()
    jaw[:, 1] = brow_y - (jaw[:, 1] - brow_y) * FOREHEAD
    hull = cv2.convexHull(np.round(np.concatenate([points, jaw])).astype(np.int32))
    mask = np.zeros((h, w), np.uint8)
    cv2.fillConvexPoly(mask, hull, 1)
    return mask


def draw_parts(canvas: np.ndarray, points: np.ndarray, color, thickness: int = 1) -> None:
    """Draw the dlib-68 facial parts of ``points`` (target pixels) as polylines on ``canvas``."""
    for first, stop, closed in FACE_PARTS.values():
        pts = np.round(points[first:stop]).astype(np.int32).reshape(-1, 1, 2)
        cv2.polylines(canvas, [pts], closed, color, thickness, lineType=cv2.LINE_8)


def render_sketch(points: np.ndarray, frame: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """The (H, W, 3) uint8 face source for landmarks ``points`` given in the pixels of ``frame``.

    ``frame`` (H, W, 3) RGB at the target resolution gives the size and the background Canny edges
    (computed at the target resolution, so they are one pixel wide like the sketch lines).
    """
    h, w = frame.shape[:2]
    sketch = np.zeros((h, w), np.uint8)
    draw_parts(sketch, points, 255)
    background = canny_edges(frame, low, high) * (1 - face_region(points, (w, h)))
    reach = max(2.0, h * DIST_FRACTION)
    dist = cv2.distanceTransform((sketch == 0).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ramp = np.clip(1.0 - dist / reach, 0.0, 1.0)
    return np.stack([sketch, background.astype(np.uint8) * 255, np.round(ramp * 255).astype(np.uint8)], -1)


# ------------------------------------------------------------------------------------------------
# crop windows


def fit_window(box: tuple[float, float, float, float], aspect: float, src: tuple[int, int]) -> list[int]:
    """Integer window ``[x0, y0, x1, y1]`` of width/height ``aspect`` covering ``box`` (x0, y0, x1, y1)
    around its centre, shrunk (keeping the aspect) and shifted to lie inside a ``src`` = (W, H) image."""
    sw, sh = src
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    bw, bh = box[2] - box[0], box[3] - box[1]
    ww = max(bw, bh * aspect, 1.0)
    ww = min(ww, sw, sh * aspect)
    wh = ww / aspect
    x0 = min(max(cx - ww / 2, 0.0), sw - ww)
    y0 = min(max(cy - wh / 2, 0.0), sh - wh)
    x0, y0 = int(round(x0)), int(round(y0))
    return [x0, y0, min(sw, x0 + max(1, int(round(ww)))), min(sh, y0 + max(1, int(round(wh))))]


def face_window(points: list[np.ndarray], aspect: float, src: tuple[int, int]) -> list[int]:
    """The per-sequence crop: ``FACE_CROP`` x the larger side of the union landmark box, centred."""
    allp = np.concatenate(points)
    (x0, y0), (x1, y1) = allp.min(0), allp.max(0)
    side = max(x1 - x0, y1 - y0) * FACE_CROP
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    return fit_window((cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2), aspect, src)


# ------------------------------------------------------------------------------------------------
# the source


class FaceSketches(Source):
    kind = "face"
    label_nc = 0
    input_nc = 3
    labels_doc = ("face sketch (T,H,W,3) 0..255: facial-part polylines, Canny edges outside the face, "
                  "distance-to-sketch ramp")

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        split = single_split(self.cfg.split)
        images = root / "images"
        lm_root = next((root / d for d in LANDMARK_DIRS if (root / d).is_dir()), None)
        if not images.is_dir() or lm_root is None:
            return Listing([], [Reject(str(root), f"face layout needs images/ and one of {list(LANDMARK_DIRS)} "
                                                  "(landmarks: see vid2vid.datasets.face.extract_landmarks)",
                                       split=split)])
        dirs, rejects = list_subdirs(images)
        for r in rejects:
            r.split = split
        seqs = []
        for d in dirs:
            try:
                seqs += self._list_one(split, d, lm_root / d.name, rejects)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
        return Listing(seqs, rejects)

    def _list_one(self, split: str, seq_dir: Path, lm_dir: Path, rejects: list[Reject]) -> list[SequenceSpec]:
        frames = list_files(seq_dir, IMAGE_EXTS)
        if not frames:
            raise BadInput(str(seq_dir), "empty folder: no frames")
        if not lm_dir.is_dir():
            raise BadInput(str(lm_dir), f"no landmark folder for sequence {seq_dir.name}")
        marks = files_by_stem(lm_dir, LANDMARK_EXTS)
        points, ok = [], []
        for i, f in enumerate(frames):
            try:
                if f.stem not in marks:
                    raise BadInput(str(lm_dir / f"{f.stem}.json"), f"missing landmark file for frame {f.name} "
                                   f"({'/'.join(sorted(LANDMARK_EXTS))})", i)
                points.append(read_landmarks(marks[f.stem], i))
                ok.append(True)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
                points.append(None)
                ok.append(False)
        orphans = sorted(set(marks) - {f.stem for f in frames})
        if orphans:
            rejects.append(Reject(str(lm_dir), f"{len(orphans)} landmark files have no frame: {orphans[:5]}",
                                  split=split))
        src = header_size(str(frames[0]), 0)
        w, h = self.size
        specs = []
        for run in good_runs(ok):
            a, b = run
            window = face_window(points[a:b], w / h, src)
            specs.append(SequenceSpec(split=split, name=run_name(seq_dir.name, run, len(frames)),
                                      num_frames=b - a, labels=[str(marks[f.stem]) for f in frames[a:b]],
                                      frames=[str(f) for f in frames[a:b]],
                                      params={"window": window, "source_size": list(src), "offset": a}))
        return specs

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        window, src, offset = spec.params["window"], tuple(spec.params["source_size"]), spec.params["offset"]
        labels, frames, decode_s, resize_s = [], [], 0.0, 0.0
        for t in range(start, stop):
            t0 = time.perf_counter()
            rgb = decode_image(spec.frames[t], offset + t, "rgb")
            check_size(rgb, src, spec.frames[t], offset + t, "frame")
            pts = read_landmarks(spec.labels[t], offset + t)
            t1 = time.perf_counter()
            frame = crop_resize(rgb, window, self.size)
            labels.append(render_sketch(to_window(pts, window, self.size), frame, self.cfg.canny_low,
                                        self.cfg.canny_high))
            frames.append(frame)
            decode_s += t1 - t0
            resize_s += time.perf_counter() - t1
        labels = np.stack(labels)
        return FrameBlock(labels, np.zeros(labels.shape[:3], np.uint8), np.stack(frames), decode_s=decode_s,
                          resize_s=resize_s)


# ------------------------------------------------------------------------------------------------
# optional landmark extraction


@dataclass
class ExtractSummary:
    written: int = 0
    kept: int = 0  # frames that already had landmarks
    no_face: list[str] = field(default_factory=list)  # frames where the detector found no face


def dlib_detector(predictor_path: str | Path) -> Callable[[np.ndarray], np.ndarray | None]:
    """dlib's HOG face detector + 68-point shape predictor (both user-installed; never downloaded)."""
    try:
        import dlib
    except ImportError:
        raise RuntimeError("landmark extraction needs dlib, which is optional and not installed: "
                           "`pip install dlib` and the 68-point model shape_predictor_68_face_landmarks.dat; "
                           "or give landmarks-dlib68/<seq>/<stem>.json yourself") from None
    if not Path(predictor_path).is_file():
        raise FileNotFoundError(f"dlib shape predictor {predictor_path} not found "
                                "(shape_predictor_68_face_landmarks.dat)")
    detect, predict = dlib.get_frontal_face_detector(), dlib.shape_predictor(str(predictor_path))

    def run(rgb: np.ndarray) -> np.ndarray | None:
        faces = detect(rgb, 1)
        if not faces:
            return None
        face = max(faces, key=lambda r: r.width() * r.height())  # the largest face: the speaker
        shape = predict(rgb, face)
        return np.array([[p.x, p.y] for p in shape.parts()], np.float32)

    return run


def extract_landmarks(root: str | Path, predictor_path: str | Path | None = None,
                      detector: Callable[[np.ndarray], np.ndarray | None] | None = None,
                      overwrite: bool = False) -> ExtractSummary:
    """Write ``<root>/landmarks-dlib68/<seq>/<stem>.json`` for every frame under ``<root>/images``.

    ``detector`` maps an RGB frame to (68, 2) points or None; default: dlib with ``predictor_path``.
    Frames without a face get no file (preparing then rejects them by name).
    """
    root = Path(root)
    if detector is None:
        if predictor_path is None:
            raise ValueError("extract_landmarks: give predictor_path (dlib) or a detector callable")
        detector = dlib_detector(predictor_path)
    summary = ExtractSummary()
    for seq in sorted(p for p in (root / "images").iterdir() if p.is_dir()):
        out = root / LANDMARK_DIRS[0] / seq.name
        out.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(list_files(seq, IMAGE_EXTS)):
            target = out / f"{f.stem}.json"
            if target.exists() and not overwrite:
                summary.kept += 1
                continue
            pts = detector(decode_image(str(f), i, "rgb"))
            if pts is None:
                summary.no_face.append(str(f))
                continue
            pts = np.asarray(pts, np.float64)
            if pts.shape != (NUM_POINTS, 2):
                raise ValueError(f"{f}: the detector returned shape {pts.shape}, expected ({NUM_POINTS}, 2)")
            target.write_text(json.dumps(np.round(pts, 2).tolist()))
            summary.written += 1
    return summary
