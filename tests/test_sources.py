"""Source readers and label transforms, checked against independent numpy computations (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from vid2vid.config import DataConfig
from vid2vid.datasets.labels import (
    BadInput,
    canny_edges,
    compact_instances,
    instance_edges,
    resize_nearest,
    validate_labels,
)
from vid2vid.datasets.readers import CityscapesRaw, SyntheticScenes, Vid2VidFolders, VideoFiles
from vid2vid.datasets.registry import detect_kind, make_source


def centre_nearest(a: np.ndarray, w: int, h: int) -> np.ndarray:
    """Nearest resize written out: sample the source at the centre of each output pixel."""
    H, W = a.shape[:2]
    ys = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return a[ys][:, xs]


def loop_edges(inst: np.ndarray) -> np.ndarray:
    h, w = inst.shape
    out = np.zeros((h, w), np.uint8)
    for y in range(h):
        for x in range(w):
            for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
                yy, xx = y + dy, x + dx
                if 0 <= yy < h and 0 <= xx < w and inst[yy, xx] != inst[y, x]:
                    out[y, x] = 1
    return out


# ------------------------------------------------------------------------------------------------
# labels.py


def test_instance_edges_match_a_pixel_loop():
    rng = np.random.default_rng(0)
    inst = rng.integers(0, 3, (9, 11)).astype(np.uint8)
    inst[2:6, 3:8] = 7
    np.testing.assert_array_equal(instance_edges(inst), loop_edges(inst))
    # batched over time
    stack = np.stack([inst, np.roll(inst, 2, axis=1)])
    np.testing.assert_array_equal(instance_edges(stack)[1], loop_edges(stack[1]))
    assert instance_edges(np.full((4, 4), 5)).sum() == 0


def test_canny_marks_the_border_of_a_square():
    img = np.zeros((40, 40, 3), np.uint8)
    img[10:30, 10:30] = 255
    edges = canny_edges(img)
    assert edges.dtype == np.uint8 and set(np.unique(edges)) == {0, 1}
    ys, xs = np.nonzero(edges)
    assert ys.min() >= 8 and ys.max() <= 31 and xs.min() >= 8 and xs.max() <= 31
    assert edges[15:25, 15:25].sum() == 0  # nothing inside the flat square


def test_resize_nearest_keeps_ids_exactly():
    rng = np.random.default_rng(1)
    lab = rng.integers(0, 34, (96, 160)).astype(np.uint8)
    np.testing.assert_array_equal(resize_nearest(lab, (40, 24)), centre_nearest(lab, 40, 24))


def test_compact_instances_keeps_boundaries_and_order():
    inst = np.array([[26001, 26001, 7], [26002, 7, 7]], np.int32)
    out = compact_instances(inst)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [[1, 1, 0], [2, 0, 0]])
    np.testing.assert_array_equal(instance_edges(out), instance_edges(inst))


def test_validate_labels_names_file_and_frame():
    validate_labels(np.full((3, 3), 34, np.uint8), 35, "a.png", 2)
    with pytest.raises(BadInput, match=r"a\.png \(frame 2\): label id 40 >= label_nc 35") as info:
        validate_labels(np.array([[1, 40]], np.uint8), 35, "a.png", 2)
    assert info.value.frame == 2 and info.value.path == "a.png"


# ------------------------------------------------------------------------------------------------
# vid2vid folders (the shared sample)


def test_vid2vid_sample_listing_and_read(sample_data):
    root = sample_data / "cityscapes_sample"
    assert detect_kind(str(root)) == "vid2vid"
    cfg = DataConfig(source=str(root), split="train,test", resolution="128x64", clip_len=4)
    listing = make_source(cfg).list()
    assert listing.rejects == []
    train = [s for s in listing.sequences if s.split == "train"]
    test = [s for s in listing.sequences if s.split == "test"]
    assert [s.name for s in train] == ["seq0000", "seq0001", "seq0002", "seq0003"]
    assert all(s.num_frames == 30 and s.has_frames for s in train)
    assert len(test) == 1 and test[0].name == "stuttgart_00" and not test[0].has_frames

    block = Vid2VidFolders(cfg).read(train[1], 3, 5)
    assert block.frames.shape == (2, 64, 128, 3) and block.labels.shape == (2, 64, 128)
    src = np.asarray(Image.open(train[1].frames[3]).convert("RGB"), np.float64)
    box = src.reshape(64, 16, 128, 16, 3).mean(axis=(1, 3))  # area resize by an integer factor
    assert np.abs(block.frames[0] - box).max() <= 1.0
    lab = np.asarray(Image.open(train[1].labels[4]))
    np.testing.assert_array_equal(block.labels[1], centre_nearest(lab, 128, 64))
    inst = np.asarray(Image.open(train[1].instances[4]))
    np.testing.assert_array_equal(block.instances[1], centre_nearest(inst, 128, 64))

    only_labels = Vid2VidFolders(cfg).read(test[0], 0, 1)
    assert only_labels.frames is None and only_labels.labels.shape == (1, 64, 128)


# ------------------------------------------------------------------------------------------------
# raw Cityscapes layout, built from the sample files


def make_raw_cityscapes(root, sample, frames: int = 3) -> None:
    """leftImg8bit_sequence + gtFine_sequence (labelIds, 16-bit instanceIds) at 256x128."""
    for seq in ("seq0000", "seq0001"):
        for t in range(frames):
            stem = sorted((sample / "train_A" / seq).iterdir())[t].stem.replace("_leftImg8bit", "")
            city = stem.split("_")[0]
            img = Image.open(sample / "train_B" / seq / f"{stem}_leftImg8bit.jpg").resize((256, 128))
            lab = np.asarray(Image.open(sample / "train_A" / seq / f"{stem}_leftImg8bit.png"))
            ins = np.asarray(Image.open(sample / "train_inst" / seq / f"{stem}_leftImg8bit.png"))
            lab, ins = centre_nearest(lab, 256, 128), centre_nearest(ins, 256, 128)
            ids = np.where(ins == 255, lab, lab.astype(np.int32) * 1000 + ins).astype(np.uint16)
            for sub, name, arr in (("leftImg8bit_sequence", "leftImg8bit", None),
                                   ("gtFine_sequence", "gtFine_labelIds", lab),
                                   ("gtFine_sequence", "gtFine_instanceIds", ids)):
                d = root / sub / "train" / city
                d.mkdir(parents=True, exist_ok=True)
                (img if arr is None else Image.fromarray(arr)).save(d / f"{stem}_{name}.png")


def test_raw_cityscapes_layout(tmp_path, sample_data):
    make_raw_cityscapes(tmp_path, sample_data / "cityscapes_sample")
    assert detect_kind(str(tmp_path)) == "cityscapes"
    cfg = DataConfig(source=str(tmp_path), resolution="64x32", clip_len=2)
    listing = make_source(cfg).list()
    assert listing.rejects == []
    assert [s.name for s in listing.sequences] == ["aachen_000000", "aachen_000001"]
    spec = listing.sequences[1]
    assert spec.num_frames == 3 and len(spec.instances) == 3
    assert [p.rsplit("_", 2)[-2] for p in spec.frames] == ["000000", "000001", "000002"]
    block = CityscapesRaw(cfg).read(spec, 0, 3)
    lab = np.asarray(Image.open(spec.labels[2]))
    np.testing.assert_array_equal(block.labels[2], centre_nearest(lab, 64, 32))
    raw = np.asarray(Image.open(spec.instances[2])).astype(np.int64)  # 16-bit ids > 255
    assert raw.max() > 255 and block.instances.dtype == np.uint8
    np.testing.assert_array_equal(instance_edges(block.instances[2]),
                                  instance_edges(centre_nearest(raw, 64, 32)))


def test_raw_cityscapes_frame_without_label_is_rejected(tmp_path, sample_data):
    make_raw_cityscapes(tmp_path, sample_data / "cityscapes_sample", frames=2)
    victim = next((tmp_path / "gtFine_sequence" / "train" / "aachen").glob("aachen_000001_*labelIds.png"))
    victim.unlink()
    listing = make_source(DataConfig(source=str(tmp_path), resolution="64x32", clip_len=2)).list()
    assert [s.name for s in listing.sequences] == ["aachen_000000"]
    assert len(listing.rejects) == 1 and "label/frame count mismatch" in listing.rejects[0].reason
    assert "aachen_000001" in listing.rejects[0].path


# ------------------------------------------------------------------------------------------------
# video files and synthetic scenes


def test_video_files_become_canny_edges(sample_data):
    videos = sample_data / "videos"
    cfg = DataConfig(source=str(videos), resolution="64x48", clip_len=4)
    assert detect_kind(str(videos)) == "video" and detect_kind(str(videos / "tree.avi")) == "video"
    listing = make_source(cfg).list()
    counts = {s.name: s.num_frames for s in listing.sequences}
    assert counts["vtest"] == 795 and counts["tree"] == 68 and counts["cup"] == 217
    src = VideoFiles(cfg)
    assert (src.label_nc, src.input_nc) == (0, 1)
    tree = next(s for s in listing.sequences if s.name == "tree")
    block = src.read(tree, 10, 13)
    assert block.frames.shape == (3, 48, 64, 3) and block.labels.shape == (3, 48, 64)
    assert set(np.unique(block.labels)) <= {0, 1} and block.labels.sum() > 0
    np.testing.assert_array_equal(block.labels[1], canny_edges(block.frames[1], cfg.canny_low, cfg.canny_high))
    assert block.instances.sum() == 0


def test_synthetic_source_matches_make_dataset():
    from vid2vid.datasets.synthetic import make_dataset

    cfg = DataConfig(source="synthetic", resolution="64x32", synthetic_sequences=2, synthetic_frames=5, seed=3)
    listing = SyntheticScenes(cfg).list()
    ref = make_dataset(2, 5, 64, 32, seed=3)
    assert [s.name for s in listing.sequences] == [r.name for r in ref]
    block = SyntheticScenes(cfg).read(listing.sequences[1], 2, 5)
    np.testing.assert_array_equal(block.frames, ref[1].frames[2:5])
    np.testing.assert_array_equal(block.flow, ref[1].flow[2:5])
    np.testing.assert_array_equal(block.confidence, ref[1].valid[2:5])


def test_detect_kind_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        detect_kind(str(tmp_path / "nowhere"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="notes.txt.*not a video"):
        detect_kind(str(tmp_path / "notes.txt"))
    with pytest.raises(ValueError, match="cannot tell the layout"):
        detect_kind(str(tmp_path))
