"""Pose->body: OpenPose/DensePose files, the skeleton rendering, scale-and-crop, and the sample on Ray."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vid2vid.config import DataConfig, load_config
from vid2vid.datasets import pose, shards
from vid2vid.datasets.labels import BadInput
from vid2vid.datasets.landmark_sources import crop_resize
from vid2vid.datasets.registry import SOURCES, detect_kind, make_source
from vid2vid.models.face_crop import face_boxes

SRC = (120, 90)  # synthetic source frames, W x H
BODY = (50, 20, 70, 80)  # x0, y0, x1, y1 of the synthetic dancer


def body_points(shift: float = 0.0) -> np.ndarray:
    """25 BODY_25 points inside BODY, all confident except the right ear (17)."""
    rng = np.random.default_rng(3)
    pts = np.stack([rng.uniform(BODY[0] + 2, BODY[2] - 2, 25) + shift, rng.uniform(BODY[1] + 2, BODY[3] - 2, 25),
                    np.full(25, 0.9)], 1)
    pts[17] = 0
    return pts


def openpose_json(points: np.ndarray | None) -> str:
    people = [] if points is None else [{"pose_keypoints_2d": points.reshape(-1).tolist()}]
    return json.dumps({"version": 1.3, "people": people})


def densepose_map(shift: int = 0) -> np.ndarray:
    iuv = np.zeros((SRC[1], SRC[0], 3), np.uint8)
    x0, y0, x1, y1 = BODY
    ys, xs = np.mgrid[y0:y1, x0 + shift:x1 + shift]
    iuv[ys, xs, 0] = (xs * 7) % 256
    iuv[ys, xs, 1] = (ys * 5) % 256
    iuv[ys, xs, 2] = 1 + (ys - y0) * 24 // (y1 - y0)  # parts 1..24 from head to feet
    return iuv


def make_pose_folder(root: Path, seqs: dict[str, int], images: bool = True) -> dict[str, list[Path]]:
    rng = np.random.default_rng(0)
    out = {}
    for seq, n in seqs.items():
        for sub in (pose.DENSEPOSE, pose.OPENPOSE) + ((pose.IMAGES,) if images else ()):
            (root / sub / seq).mkdir(parents=True)
        out[seq] = []
        for t in range(n):
            stem = f"frame{t:06d}"
            Image.fromarray(densepose_map(t)).save(root / pose.DENSEPOSE / seq / f"{stem}.png")
            op = root / pose.OPENPOSE / seq / f"{stem}.json"
            op.write_text(openpose_json(body_points(t)))
            out[seq].append(op)
            if images:
                Image.fromarray(rng.integers(0, 255, (SRC[1], SRC[0], 3), dtype=np.uint8)).save(
                    root / pose.IMAGES / seq / f"{stem}.jpg")
    return out


# ------------------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("content, reason", [
    ("", "empty JSON file"),
    ("{}", "empty JSON: no 'people' list"),
    ("[1, 2]", "wrong shape: expected an object"),
    ('{"version": 1.3}', "no 'people' list"),
    ('{"people": {}}', "wrong shape: 'people' is a dict"),
    ('{"people": [', "not valid JSON"),
    ('{"people": []}', "missing points: no person"),
    (json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 74}]}), "pose_keypoints_2d has 74 values, expected 75"),
    (json.dumps({"people": [{"pose_keypoints_2d": [0.0] * 75}]}), "missing points: no person"),
    (json.dumps({"people": [{"face_keypoints_2d": [1.0] * 210}]}), "pose_keypoints_2d has 0 values"),
    (json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 75, "hand_left_keypoints_2d": [1.0] * 60}]}),
     "hand_left_keypoints_2d has 60 values, expected 63 (21 points)"),
    ('{"people": [{"pose_keypoints_2d": [NaN' + ", 1.0" * 74 + "]}]}", "missing points: non-finite"),
    ('{"people": [{"pose_keypoints_2d": [null' + ", 1.0" * 74 + "]}]}", "missing points: non-finite"),
    ('{"people": [{"pose_keypoints_2d": ["a"' + ", 1.0" * 74 + "]}]}", "not a flat list of numbers"),
])
def test_bad_openpose_files_are_rejected_with_file_and_reason(tmp_path, content, reason):
    path = tmp_path / "frame000003.json"
    path.write_text(content)
    with pytest.raises(BadInput) as err:
        pose.read_openpose(path, frame=3)
    assert err.value.path == str(path) and err.value.frame == 3 and reason in err.value.reason


def test_openpose_people_parse_and_the_dancer_is_the_fullest_skeleton(tmp_path):
    full, partial = body_points(), body_points(40)
    partial[:20, 2] = 0
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"people": [{"pose_keypoints_2d": partial.reshape(-1).tolist()},
                                           {"pose_keypoints_2d": full.reshape(-1).tolist(),
                                            "face_keypoints_2d": [1.0] * 210, "hand_right_keypoints_2d": []}]}))
    people = pose.read_openpose(path)
    assert len(people) == 2 and people[1].face.shape == (70, 3) and people[1].hand_right is None
    dancer = pose.main_person(people)
    assert dancer is people[1]
    np.testing.assert_allclose(dancer.centre(), full[full[:, 2] > 0, :2].mean(0))


def test_densepose_maps_must_be_iuv(tmp_path):
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(tmp_path / "grey.png")
    with pytest.raises(BadInput, match="mode L; expected an RGB IUV map"):
        pose.read_densepose(str(tmp_path / "grey.png"), 0)
    bad = densepose_map()
    bad[30, 60, 2] = 30
    Image.fromarray(bad).save(tmp_path / "bad.png")
    with pytest.raises(BadInput, match="part index 30 > 24"):
        pose.read_densepose(str(tmp_path / "bad.png"), 0)
    iuv = densepose_map()
    out = pose.densepose_channels(iuv)
    np.testing.assert_array_equal(out[..., :2], iuv[..., :2])
    np.testing.assert_array_equal(out[..., 2], np.round(iuv[..., 2] * (255 / 24)).astype(np.uint8))
    assert out[..., 2].max() == 255


# ------------------------------------------------------------------------------------------------
# rendering and crop


def test_skeleton_limbs_are_drawn_between_confident_points_only():
    pts = np.zeros((25, 3))
    pts[1], pts[8], pts[2] = (10, 5, 0.9), (10, 40, 0.9), (30, 5, 0.01)  # neck, mid-hip, unsure shoulder
    canvas = pose.render_openpose([pose.Person(pts)], [0, 0, 64, 64], (64, 64))
    colour = pose._hue_colours(len(pose.BODY_25))[0]  # limb 0 = neck -> mid-hip
    np.testing.assert_array_equal(canvas[5:41, 10], np.tile(colour, (36, 1)))
    lit = canvas.any(-1)
    assert lit.sum() == 36 and not lit[:, 11:].any()  # the unsure shoulder's limb is not drawn
    # COCO-18 skeletons draw with their own limb table; crop windows move and scale the points
    coco = np.zeros((18, 3))
    coco[1], coco[8] = (20, 10, 1), (20, 30, 1)  # neck, right hip
    canvas = pose.render_openpose([pose.Person(coco)], [10, 0, 42, 64], (16, 32))
    assert canvas.any(-1)[:, 5].sum() == 11 and canvas.any(-1).sum() == 11


def test_crop_window_zoom_position_and_determinism():
    size = (32, 64)
    fixed = pose.crop_window((1920, 1080), size, (983.0, 600.0))
    assert fixed == [713, 0, 1253, 1080]  # zoom 1: full height, centred on the dancer
    assert pose.crop_window((1920, 1080), size, (10.0, 600.0))[:2] == [0, 0]  # clamped into the frame
    draws = [pose.crop_window((1920, 1080), size, (983.0, 600.0), pose.shard_rng(0, "seq", s)) for s in range(40)]
    assert draws == [pose.crop_window((1920, 1080), size, (983.0, 600.0), pose.shard_rng(0, "seq", s))
                     for s in range(40)]
    heights = np.array([y1 - y0 for _, y0, _, y1 in draws])
    widths = np.array([x1 - x0 for x0, _, x1, _ in draws])
    assert (heights >= math.floor(1080 / pose.MAX_ZOOM)).all() and (heights <= 1080).all()
    assert np.ptp(heights) > 100 and len({tuple(d) for d in draws}) == 40  # it really varies
    assert np.abs(widths * 2 - heights).max() <= 2  # the target aspect
    assert all(0 <= x0 and x1 <= 1920 and 0 <= y0 and y1 <= 1080 for x0, y0, x1, y1 in draws)
    centres = np.array([(x0 + x1) / 2 for x0, _, x1, _ in draws])
    assert abs(np.median(centres) - 983) < 60  # around the dancer


# ------------------------------------------------------------------------------------------------
# the source


def test_layout_detection_and_source_registry(tmp_path):
    make_pose_folder(tmp_path, {"s": 1})
    assert detect_kind(str(tmp_path)) == "pose" and SOURCES["pose"] is pose.PoseMaps
    src = make_source(DataConfig(source=str(tmp_path), resolution="32x64"))
    assert isinstance(src, pose.PoseMaps) and (src.label_nc, src.input_nc) == (0, 6)


def test_bad_openpose_files_cut_the_sequence_and_are_named(tmp_path):
    files = make_pose_folder(tmp_path, {"a": 7, "b": 2})
    files["a"][3].write_text("{}")
    files["b"][0].unlink()
    listing = pose.PoseMaps(DataConfig(source=str(tmp_path), resolution="32x64")).list()
    assert {s.name: (s.num_frames, s.params["offset"]) for s in listing.sequences} == {
        "a-f00000": (3, 0), "a-f00004": (3, 4), "b-f00001": (1, 1)}
    by_path = {r.path: r for r in listing.rejects}
    bad = by_path[str(files["a"][3])]
    assert bad.reason == "empty JSON: no 'people' list" and bad.frame == 3
    assert by_path[str(files["b"][0])].reason == "missing OpenPose file"
    spec = next(s for s in listing.sequences if s.name == "a-f00004")
    assert spec.params["openpose"][0] == str(files["a"][4]) and spec.has_frames


def test_read_concatenates_densepose_and_skeleton_in_one_window(tmp_path):
    make_pose_folder(tmp_path, {"a": 3})
    src = pose.PoseMaps(DataConfig(source=str(tmp_path), resolution="32x64", split="test"))
    spec = src.list().sequences[0]
    block = src.read(spec, 0, 3)
    assert block.labels.shape == (3, 64, 32, 6) and block.frames.shape == (3, 64, 32, 3)
    window = src.window(spec, 0)
    assert window == pose.crop_window(SRC, (32, 64), tuple(spec.params["centre"]))  # test split: no draw
    raw = np.asarray(Image.open(spec.frames[1]).convert("RGB"))
    np.testing.assert_array_equal(block.frames[1], crop_resize(raw, window, (32, 64)))
    dense = pose.densepose_channels(crop_resize(densepose_map(1), window, (32, 64), nearest=True))
    np.testing.assert_array_equal(block.labels[1, ..., :3], dense)
    skeleton = pose.render_openpose([pose.Person(body_points(1))], window, (32, 64))
    np.testing.assert_array_equal(block.labels[1, ..., 3:], skeleton)
    # the skeleton lies on the body: every limb pixel is on (or next to) a DensePose body pixel
    body = np.pad(dense[..., 2] > 0, 1)
    near = body[1:-1, 1:-1] | body[:-2, 1:-1] | body[2:, 1:-1] | body[1:-1, :-2] | body[1:-1, 2:]
    assert near[skeleton.any(-1)].all()


def test_train_split_draws_a_window_per_shard_and_labels_only_without_images(tmp_path):
    make_pose_folder(tmp_path, {"a": 4}, images=False)
    src = pose.PoseMaps(DataConfig(source=str(tmp_path), resolution="32x64", seed=5))
    spec = src.list().sequences[0]
    assert not spec.has_frames and spec.frames == []
    windows = {tuple(src.window(spec, s)) for s in range(8)}
    assert len(windows) > 1 and src.window(spec, 2) == src.window(spec, 2)
    block = src.read(spec, 1, 3)
    assert block.frames is None and block.labels.shape == (2, 64, 32, 6)
    Image.fromarray(np.zeros((SRC[1], SRC[0] + 2, 3), np.uint8)).save(
        tmp_path / pose.DENSEPOSE / "a" / "frame000002.png")
    with pytest.raises(BadInput, match="size changed") as err:
        src.read(spec, 0, 4)
    assert err.value.frame == 2


# ------------------------------------------------------------------------------------------------
# the shared sample end to end: shards with bad files beside it, a smoke training run, a video


@pytest.mark.ray
def test_pose_sample_prepares_trains_and_generates_a_video(tmp_path, sample_data, ray_cluster):
    from test_face import generate_video

    from vid2vid.datasets.prepare import prepare
    from vid2vid.platform.trainer import train

    sample = sample_data / "imaginaire_samples" / "pose"
    root = tmp_path / "pose"
    for seq in ("good", "bad_json", "bad_map"):
        for sub in (pose.IMAGES, pose.DENSEPOSE, pose.OPENPOSE, pose.INSTANCES):
            (root / sub / seq).mkdir(parents=True)
            for f in sorted((sample / sub / "001_001").iterdir()):
                (root / sub / seq / f.name).symlink_to(f)
    bad_json = root / pose.OPENPOSE / "bad_json" / "frame000104.json"
    bad_json.unlink()
    bad_json.write_text('{"people": [{"pose_keypoints_2d": [1.0, 2.0, 0.5]}]}')
    bad_map = root / pose.DENSEPOSE / "bad_map" / "frame000101.png"
    bad_map.unlink()
    Image.new("L", (1920, 1080)).save(bad_map)
    cfg = load_config(["preset=pose_smoke", f"data.source={root}", f"data.out={tmp_path / 'shards'}",
                       f"train.run_dir={tmp_path / 'runs'}", "train.max_steps=2"])
    summary = prepare(cfg.data, progress=False)
    assert summary.clips == {"train": 3}  # good: 2 clips; bad_json: frames 100-103, 1 clip; bad_map: none
    manifest = shards.load_manifest(cfg.data.out)
    assert (manifest["source_kind"], manifest["label_nc"], manifest["input_nc"]) == ("pose", 0, 6)
    rejected = {r["path"]: r for r in manifest["rejected"]}
    assert set(rejected) == {str(bad_json), str(bad_map)}
    assert rejected[str(bad_json)]["reason"].startswith("wrong shape: person 0 pose_keypoints_2d has 3 values")
    assert rejected[str(bad_json)]["frame"] == 4
    assert rejected[str(bad_map)]["reason"].startswith("DensePose map has mode L")
    assert rejected[str(bad_map)]["frame"] == 1
    clip = next(shards.iter_clips(cfg.data.out))
    assert clip.labels.shape == (1, 4, 6, 128, 64) and clip.labels.max() <= 1 and clip.labels[:, :, 3:].sum() > 0
    parts = clip.labels[:, :, 2] * 24  # stored as round(I * 255 / 24): the part index rounds back
    assert ((parts - parts.round()).abs() < 0.05).all() and 10 <= parts.max() <= 24
    assert face_boxes(clip.labels[0], cfg.model.face_crop).found.all()  # the face discriminator sees the head

    result = train(cfg, cfg.data.out)
    assert result.metrics["step"] == 2 and np.isfinite(result.metrics["G/total"])
    assert np.isfinite(result.metrics["G/face_gan"]) and np.isfinite(result.metrics["D/face"])
    assert generate_video(Path(result.checkpoint), Path(cfg.data.out), tmp_path / "pose.mp4") == (4, 128, 64)
