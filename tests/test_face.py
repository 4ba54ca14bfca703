"""Edge->face: landmark files, the sketch rendering, the face source, and the sample end to end on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from vid2vid.config import DataConfig, load_config
from vid2vid.datasets import face, landmark_sources, shards
from vid2vid.datasets.labels import BadInput, canny_edges
from vid2vid.datasets.registry import SOURCES, detect_kind, make_source

SAMPLE_SEQ = "ZzTpJYDc62E_4_ZzTpJYDc62E_4"


def _line(x0, x1, y0, y1, n):
    return np.stack([np.linspace(x0, x1, n), np.linspace(y0, y1, n)], 1)


def _ring(x, y, rx, ry, n):
    a = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([x + rx * np.cos(a), y + ry * np.sin(a)], 1)


def synthetic_face(cx: float, cy: float, s: float) -> np.ndarray:
    """68 dlib-ordered points of a cartoon face of radius ``s`` centred at (cx, cy)."""
    th = np.linspace(np.pi, 0, 17)
    parts = [np.stack([cx + s * np.cos(th), cy + s * np.sin(th)], 1),  # jaw, ear to ear under the chin
             _line(cx - .8 * s, cx - .2 * s, cy - .5 * s, cy - .5 * s, 5),  # brows
             _line(cx + .2 * s, cx + .8 * s, cy - .5 * s, cy - .5 * s, 5),
             _line(cx, cx, cy - .4 * s, cy, 4), _line(cx - .2 * s, cx + .2 * s, cy + .1 * s, cy + .1 * s, 5),  # nose
             _ring(cx - .45 * s, cy - .3 * s, .12 * s, .06 * s, 6),  # eyes
             _ring(cx + .45 * s, cy - .3 * s, .12 * s, .06 * s, 6),
             _ring(cx, cy + .45 * s, .3 * s, .12 * s, 12), _ring(cx, cy + .45 * s, .2 * s, .05 * s, 8)]  # lips
    pts = np.concatenate(parts).astype(np.float32)
    assert pts.shape == (68, 2)
    return pts


def make_face_folder(root: Path, seqs: dict[str, int], size=(80, 60), seed=0) -> dict[str, list[Path]]:
    """images/<seq>/ noise frames + landmarks-dlib68/<seq>/*.json of a slowly moving synthetic face."""
    rng = np.random.default_rng(seed)
    out = {}
    for seq, n in seqs.items():
        (root / "images" / seq).mkdir(parents=True)
        (root / "landmarks-dlib68" / seq).mkdir(parents=True)
        out[seq] = []
        for t in range(n):
            Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(
                root / "images" / seq / f"{t:05d}.png")
            lm = root / "landmarks-dlib68" / seq / f"{t:05d}.json"
            lm.write_text(json.dumps(synthetic_face(40 + t, 32, 14).tolist()))
            out[seq].append(lm)
    return out


# ------------------------------------------------------------------------------------------------
# landmark files


def test_landmarks_read_the_same_from_json_txt_and_npy(tmp_path):
    pts = synthetic_face(50, 40, 20)
    (tmp_path / "a.json").write_text(json.dumps(pts.tolist()))
    (tmp_path / "b.json").write_text(json.dumps(pts.reshape(-1).tolist()))  # 136 flat numbers
    (tmp_path / "c.txt").write_text("\n".join(f"{x},{y}" for x, y in pts))
    (tmp_path / "d.txt").write_text("\n".join(f"{x} {y}" for x, y in pts))
    np.save(tmp_path / "e.npy", pts)
    for name in ("a.json", "b.json", "c.txt", "d.txt", "e.npy"):
        np.testing.assert_allclose(face.read_landmarks(tmp_path / name), pts, atol=1e-4)


@pytest.mark.parametrize("content, reason", [
    ("", "empty landmark file"),
    ("[]", "empty JSON"),
    ("{}", "empty JSON"),
    ("[[1, 2], [3", "not valid JSON"),
    (json.dumps([[1.0, 2.0]] * 67), "expected 68 (x, y) points, got 67 points"),
    (json.dumps([[1.0, 2.0, 0.9]] * 68), "wrong shape"),
    (json.dumps([[1.0, 2.0]] * 67 + [[None, 2.0]]), "missing points"),
    (json.dumps([[1.0, 2.0]] * 67 + [[1.0]]), "not a numeric (68, 2) array"),
])
def test_bad_landmark_files_are_rejected_with_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "00007.json"
    path.write_text(content)
    with pytest.raises(BadInput) as err:
        face.read_landmarks(path, frame=7)
    assert err.value.path == str(path) and err.value.frame == 7 and reason in err.value.reason


# ------------------------------------------------------------------------------------------------
# rendering


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    u = np.clip(((p - a) @ ab) / max(float(ab @ ab), 1e-9), 0, 1)
    return np.linalg.norm(p - (a + u[:, None] * ab), axis=1)


def test_sketch_lines_pass_through_the_landmarks_and_nowhere_else():
    pts = synthetic_face(48, 44, 24)
    frame = np.full((96, 96, 3), 128, np.uint8)
    sketch = face.render_sketch(pts, frame)
    assert sketch.shape == (96, 96, 3) and sketch.dtype == np.uint8
    lit = sketch[..., 0] == 255
    assert set(np.unique(sketch[..., 0])) <= {0, 255}
    r = np.round(pts).astype(int)
    assert lit[r[:, 1], r[:, 0]].all()  # every landmark is on a line
    # every lit pixel lies within one pixel of a segment of some facial part
    segs = [(pts[i], pts[i + 1]) for a, b, _ in landmark_sources.FACE_PARTS.values() for i in range(a, b - 1)]
    segs += [(pts[b - 1], pts[a]) for a, b, closed in landmark_sources.FACE_PARTS.values() if closed]
    ys, xs = np.nonzero(lit)
    p = np.stack([xs, ys], 1).astype(np.float64)
    nearest = np.min([_segment_distance(p, a, b) for a, b in segs], axis=0)
    assert nearest.max() <= 1.0
    # parts are not joined to each other: the midpoint between the jaw's end and the brow stays dark
    mid = np.round((pts[16] + pts[26]) / 2).astype(int)
    assert not lit[mid[1], mid[0]]


def test_distance_channel_is_the_euclidean_ramp_to_the_sketch():
    pts = synthetic_face(48, 44, 24)
    sketch = face.render_sketch(pts, np.full((96, 96, 3), 128, np.uint8))
    d = ndimage.distance_transform_edt(sketch[..., 0] == 0)  # independent exact distance
    reach = 96 * face.DIST_FRACTION
    expected = np.round(np.clip(1 - d / reach, 0, 1) * 255)
    assert np.abs(sketch[..., 2].astype(float) - expected).max() <= 1
    assert (sketch[..., 2] == 255).sum() == (sketch[..., 0] == 255).sum()


def test_background_edges_are_canny_outside_the_face_region_only():
    pts = synthetic_face(48, 44, 20)
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[:, 40:] = 255  # a vertical edge crossing the face and the background
    sketch = face.render_sketch(pts, frame)
    region = face.face_region(pts, (96, 96))
    edges = canny_edges(frame)
    bg = sketch[..., 1] == 255
    np.testing.assert_array_equal(bg, (edges == 1) & (region == 0))
    assert bg[:10].any() and bg[90:].any()  # above the forehead and below the chin: background
    assert region[44, 48] == 1 and region[int(44 - 0.5 * 20 - 2), 48] == 1  # forehead is face
    assert not bg[30:60, 38:43].any()  # the edge inside the face is dropped


def test_face_window_keeps_the_target_aspect_and_stays_inside_the_frame():
    pts = [synthetic_face(30, 30, 10), synthetic_face(34, 31, 10)]
    x0, y0, x1, y1 = face.face_window(pts, 2.0, (200, 100))
    assert 0 <= x0 < x1 <= 200 and 0 <= y0 < y1 <= 100
    assert abs((x1 - x0) - 2 * (y1 - y0)) <= 1
    box = np.concatenate(pts)
    assert x0 <= box[:, 0].min() and box[:, 0].max() <= x1 and y0 <= box[:, 1].min() and box[:, 1].max() <= y1
    # a box bigger than the frame: the window shrinks to fit (aspect kept) and shifts inside
    assert face.fit_window((-50, -50, 250, 250), 1.0, (120, 80)) == [40, 0, 120, 80]
    # pixel centres of the window's corners map to the target's corner pixel centres
    corners = np.array([[x0 + 0.5 * (x1 - x0) / 64 - 0.5, y0 + 0.5 * (y1 - y0) / 32 - 0.5]], np.float32)
    np.testing.assert_allclose(landmark_sources.to_window(corners, [x0, y0, x1, y1], (64, 32)), [[0, 0]], atol=1e-4)


# ------------------------------------------------------------------------------------------------
# the source


def test_layout_detection_and_source_registry(tmp_path):
    make_face_folder(tmp_path, {"s": 2})
    assert detect_kind(str(tmp_path)) == "face"
    assert SOURCES["face"] is face.FaceSketches
    src = make_source(DataConfig(source=str(tmp_path), resolution="32x32"))
    assert isinstance(src, face.FaceSketches) and (src.label_nc, src.input_nc) == (0, 3)


def test_bad_and_missing_landmarks_cut_the_sequence_and_are_named(tmp_path):
    files = make_face_folder(tmp_path, {"a": 9, "b": 3})
    files["a"][4].write_text("[]")  # empty JSON at frame 4
    files["b"][1].unlink()  # missing landmark file at frame 1
    (tmp_path / "landmarks-dlib68" / "b" / "09999.json").write_text("[]")  # landmarks without a frame
    listing = face.FaceSketches(DataConfig(source=str(tmp_path), resolution="32x32")).list()
    runs = {s.name: (s.num_frames, s.params["offset"]) for s in listing.sequences}
    assert runs == {"a-f00000": (4, 0), "a-f00005": (4, 5), "b-f00000": (1, 0), "b-f00002": (1, 2)}
    by_path = {r.path: r for r in listing.rejects}
    assert "empty JSON" in by_path[str(files["a"][4])].reason and by_path[str(files["a"][4])].frame == 4
    assert "missing landmark file" in by_path[str(files["b"][1])].reason and by_path[str(files["b"][1])].frame == 1
    assert "have no frame" in by_path[str(tmp_path / "landmarks-dlib68" / "b")].reason
    assert all(r.split == "train" for r in listing.rejects)


def test_read_renders_the_crop_with_landmarks_in_target_pixels(tmp_path):
    make_face_folder(tmp_path, {"a": 3}, size=(120, 90))
    src = face.FaceSketches(DataConfig(source=str(tmp_path), resolution="48x32"))
    spec = src.list().sequences[0]
    block = src.read(spec, 1, 3)
    assert block.labels.shape == (2, 32, 48, 3) and block.frames.shape == (2, 32, 48, 3)
    assert block.instances.shape == (2, 32, 48) and not block.instances.any()
    x0, y0, x1, y1 = spec.params["window"]
    assert abs((x1 - x0) * 32 - (y1 - y0) * 48) <= 48  # target aspect, to a pixel
    raw = np.asarray(Image.open(spec.frames[1]).convert("RGB"))
    np.testing.assert_array_equal(block.frames[0], landmark_sources.crop_resize(raw, [x0, y0, x1, y1], (48, 32)))
    pts = synthetic_face(41, 32, 14)  # frame 1's landmarks, mapped by hand
    mapped = np.stack([(pts[:, 0] + .5 - x0) * 48 / (x1 - x0) - .5, (pts[:, 1] + .5 - y0) * 32 / (y1 - y0) - .5], 1)
    r = np.round(mapped).astype(int)
    assert (block.labels[0, r[:, 1], r[:, 0], 0] == 255).all()


def test_read_names_a_frame_whose_size_changes(tmp_path):
    make_face_folder(tmp_path, {"a": 3})
    Image.new("RGB", (70, 60)).save(tmp_path / "images" / "a" / "00002.png")
    src = face.FaceSketches(DataConfig(source=str(tmp_path), resolution="32x32"))
    with pytest.raises(BadInput, match="size changed") as err:
        src.read(src.list().sequences[0], 0, 3)
    assert err.value.frame == 2 and err.value.path.endswith("00002.png")


def test_extract_landmarks_with_a_detector_writes_files_the_source_reads(tmp_path):
    make_face_folder(tmp_path, {"a": 3})
    import shutil

    shutil.rmtree(tmp_path / "landmarks-dlib68")
    calls = []

    def detector(rgb):
        calls.append(rgb.shape)
        return None if len(calls) == 2 else synthetic_face(40, 30, 12)

    summary = face.extract_landmarks(tmp_path, detector=detector)
    assert (summary.written, summary.kept) == (2, 0) and summary.no_face == [str(tmp_path / "images/a/00001.png")]
    assert calls == [(60, 80, 3)] * 3
    np.testing.assert_allclose(face.read_landmarks(tmp_path / "landmarks-dlib68/a/00000.json"),
                               synthetic_face(40, 30, 12), atol=0.01)
    assert face.extract_landmarks(tmp_path, detector=detector).kept == 2  # existing files are kept
    try:
        import dlib  # noqa: F401
    except ImportError:
        with pytest.raises(RuntimeError, match="pip install dlib"):
            face.extract_landmarks(tmp_path, predictor_path=tmp_path / "missing.dat")


def test_dense_shard_labels_become_channel_first_unit_floats():
    labels = (np.arange(2 * 4 * 5 * 3) % 256).astype(np.uint8).reshape(1, 2, 4, 5, 3)
    clip = shards.Clip.from_batch({"labels": labels, "instance_edges": np.zeros((1, 2, 4, 5), np.uint8),
                                   "instances": np.zeros((1, 2, 4, 5), np.uint8)})
    assert clip.labels.shape == (1, 2, 3, 4, 5) and clip.labels.dtype == torch.float32
    np.testing.assert_allclose(clip.labels.numpy(), labels.transpose(0, 1, 4, 2, 3) / 255.0, atol=1e-7)


# ------------------------------------------------------------------------------------------------
# the shared sample end to end: shards with a bad file beside it, a smoke training run, a video


@pytest.mark.ray
def test_face_sample_prepares_trains_and_generates_a_video(tmp_path, sample_data, ray_cluster):
    from vid2vid.datasets.prepare import prepare
    from vid2vid.platform.trainer import train

    sample = sample_data / "imaginaire_samples" / "face"
    root = tmp_path / "face"
    for seq in ("good", "bad"):
        for sub in ("images", "landmarks-dlib68"):
            (root / sub / seq).mkdir(parents=True)
            for f in sorted((sample / sub / SAMPLE_SEQ).iterdir()):
                (root / sub / seq / f.name).symlink_to(f)
    bad = root / "landmarks-dlib68" / "bad" / "00004.json"
    bad.unlink()
    bad.write_text(json.dumps(json.loads((sample / "landmarks-dlib68" / SAMPLE_SEQ / "00004.json").read_text())[:60]))
    cfg = load_config(["preset=face_smoke", f"data.source={root}", f"data.out={tmp_path / 'shards'}",
                       f"train.run_dir={tmp_path / 'runs'}", "train.max_steps=2"])
    summary = prepare(cfg.data, progress=False)
    assert summary.clips == {"train": 3}  # good: frames 0-4 (2 clips); bad: frames 0-3 (1 clip)
    manifest = shards.load_manifest(cfg.data.out)
    assert (manifest["source_kind"], manifest["label_nc"], manifest["input_nc"]) == ("face", 0, 3)
    assert manifest["rejected"] == [{"path": str(bad), "frame": 4, "split": "train",
                                     "reason": "wrong shape: expected 68 (x, y) points, got 60 points"}]
    clip = next(shards.iter_clips(cfg.data.out))
    assert clip.labels.shape == (1, 4, 3, 64, 64) and 0 <= clip.labels.min() and clip.labels.max() <= 1
    assert clip.labels[:, :, 0].sum() > 0 and clip.flow.shape == (1, 4, 2, 64, 64)

    result = train(cfg, cfg.data.out)
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["G/total"])
    video = generate_video(Path(result.checkpoint), Path(cfg.data.out), tmp_path / "face.mp4")
    assert video == (4, 64, 64)


def generate_video(checkpoint: Path, shard_dir: Path, out: Path) -> tuple[int, int, int]:
    """Checkpoint + the first prepared clip -> mp4; returns (frames, height, width) decoded back.

    ``vid2vid generate`` reads dense shards as one channel; until it reads (H, W, C) face/pose maps
    this renders with generate_sequence + write_video, the same model path.
    """
    import av

    from vid2vid.checkpoints import load_generator
    from vid2vid.media import to_uint8, write_video
    from vid2vid.models.vid2vid import generate_sequence, prepare_inputs

    cfg, gen = load_generator(checkpoint)
    clip = next(shards.iter_clips(shard_dir))
    with torch.no_grad():
        seq = generate_sequence(gen, cfg.model, prepare_inputs(cfg.model, clip.labels, clip.instance_edges))
    assert torch.isfinite(seq.frames).all()
    write_video(out, to_uint8(seq.frames[0]), fps=8)
    with av.open(str(out)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return len(frames), *frames[0].shape[:2]
