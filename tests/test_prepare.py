"""The Ray Data prepare pipeline on real data: the Cityscapes sample and a real video file."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vid2vid.config import DataConfig
from vid2vid.datasets import shards
from vid2vid.datasets.flow import warp_image_np
from vid2vid.datasets.labels import canny_edges, instance_edges
from vid2vid.datasets.prepare import prepare

pytestmark = pytest.mark.ray


def centre_nearest(a: np.ndarray, w: int, h: int) -> np.ndarray:
    H, W = a.shape[:2]
    ys = np.minimum(((np.arange(h) + 0.5) * H / h).astype(int), H - 1)
    xs = np.minimum(((np.arange(w) + 0.5) * W / w).astype(int), W - 1)
    return a[ys][:, xs]


def link_subset(sample: Path, dst: Path, spec: dict[str, tuple[list[str], int]]) -> None:
    """A vid2vid-layout folder of symlinks to the first frames of some sample sequences (fast tests)."""
    for split, (seqs, n) in spec.items():
        for sub in ("A", "B", "inst"):
            for seq in seqs:
                src = sample / f"{split}_{sub}" / seq
                if not src.is_dir():
                    continue
                (dst / f"{split}_{sub}" / seq).mkdir(parents=True)
                for f in sorted(src.iterdir())[:n]:
                    (dst / f"{split}_{sub}" / seq / f.name).symlink_to(f)


def test_cityscapes_sample(tmp_path, sample_data, ray_cluster):
    """At the acceptance resolution, 512x256 (a factor 4 below the 2048x1024 sample)."""
    sample = sample_data / "cityscapes_sample"
    root, out = tmp_path / "data", tmp_path / "out"
    link_subset(sample, root, {"train": (["seq0000", "seq0002"], 8), "test": (["stuttgart_00"], 4)})
    cfg = DataConfig(source=str(root), split="all", out=str(out), resolution="512x256", clip_len=4)
    summary = prepare(cfg, progress=False)
    assert summary.clips == {"test": 1, "train": 4} and summary.written == summary.clips
    assert summary.rejected == [] and summary.frames == 2 * 8 + 4

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["schema_version"] == shards.SCHEMA_VERSION and manifest["source_kind"] == "vid2vid"
    assert manifest["label_nc"] == 35 and manifest["resolution"] == [512, 256] and manifest["clip_len"] == 4
    assert manifest["splits"]["train"] == {"clips": 4, "sequences": 2, "has_frames": True}
    assert manifest["splits"]["test"] == {"clips": 1, "sequences": 1, "has_frames": False}
    assert manifest["flow"]["estimator"] == "dis" and manifest["rejected"] == []
    assert sorted(s["path"] for s in manifest["shards"]) == [
        "test/stuttgart_00-0000.parquet", "train/seq0000-0000.parquet", "train/seq0002-0000.parquet"]

    for clip in shards.iter_clips(out, "train"):
        seq, start = clip.sequence[0], int(clip.start[0])
        stems = sorted(p.stem for p in (root / "train_A" / seq).iterdir())[start:start + 4]
        frames = ((clip.frames[0].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round()
        for t, stem in enumerate(stems):
            src = np.asarray(Image.open(root / "train_B" / seq / f"{stem}.jpg").convert("RGB"), np.float64)
            box = src.reshape(256, 4, 512, 4, 3).mean(axis=(1, 3))  # area resize, integer factor 4
            assert np.abs(frames[t] - box).max() <= 1.0
            lab = centre_nearest(np.asarray(Image.open(root / "train_A" / seq / f"{stem}.png")), 512, 256)
            np.testing.assert_array_equal(clip.labels[0, t].numpy(), lab)  # ids preserved exactly
            inst = centre_nearest(np.asarray(Image.open(root / "train_inst" / seq / f"{stem}.png")), 512, 256)
            np.testing.assert_array_equal(clip.instance_edges[0, t].numpy(), instance_edges(inst))
        # flow is backward: warping frame t-1 with flow[t] must explain frame t better than frame t-1
        flow = clip.flow[0].permute(0, 2, 3, 1).numpy()
        conf = clip.confidence[0, :, 0].numpy()
        assert np.all(flow[0] == 0) and np.all(conf[0] == 0) and conf[1:].mean() > 0.5
        for t in range(1, 4):
            warped = warp_image_np(frames[t - 1].astype(np.float32), flow[t])
            mask = conf[t] > 0
            err, still = np.abs(warped - frames[t])[mask].mean(), np.abs(frames[t - 1] - frames[t])[mask].mean()
            assert err < 0.7 * still, (seq, t, err, still)

    (test_clip,) = list(shards.iter_clips(out, "test"))
    assert test_clip.frames is None and test_clip.labels.shape == (1, 4, 256, 512)

    # idempotent: a re-run keeps complete shards untouched; overwrite rewrites them
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")}
    again = prepare(cfg, progress=False)
    assert again.written == {} and again.skipped_shards == 3 and again.clips == summary.clips
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.parquet")} == mtimes
    stale = out / "train" / "old-0000.parquet"
    shutil.copy(out / "train" / "seq0000-0000.parquet", stale)
    cfg.overwrite, cfg.split = True, "train"
    rewritten = prepare(cfg, progress=False)
    assert rewritten.written == {"train": 4} and not stale.exists()
    assert all(p.stat().st_mtime_ns != mtimes[p] for p in out.glob("train/*.parquet"))
    # the test split, not part of this run, is kept in the manifest with its shard untouched
    assert rewritten.clips == {"test": 1, "train": 4}
    test_shard = out / "test" / "stuttgart_00-0000.parquet"
    assert test_shard.stat().st_mtime_ns == mtimes[test_shard]
    assert len(list(shards.iter_clips(out, "test"))) == 1


def test_real_video_becomes_edge_to_video_shards(tmp_path, sample_data, ray_cluster):
    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    os.symlink(sample_data / "videos" / "tree.avi", videos / "tree.avi")
    cfg = DataConfig(source=str(videos), out=str(out), resolution="64x48", clip_len=4, clip_stride=32)
    summary = prepare(cfg, progress=False)
    assert summary.clips == {"train": 3}  # 68 frames: clips at 0, 32, 64

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source_kind"] == "video" and manifest["label_nc"] == 0 and manifest["input_nc"] == 1
    assert "Canny" in manifest["labels"]
    clips = list(shards.iter_clips(out))
    assert [int(c.start[0]) for c in clips] == [0, 32, 64]
    for clip in clips:
        frames = ((clip.frames[0].permute(0, 2, 3, 1).numpy() + 1) * 127.5).round().astype(np.uint8)
        labels = clip.labels[0].numpy()
        assert set(np.unique(labels)) == {0, 1}
        for t in range(4):
            np.testing.assert_array_equal(labels[t], canny_edges(frames[t], cfg.canny_low, cfg.canny_high))
        assert clip.flow.shape == (1, 4, 2, 48, 64) and clip.flow[0, 1:].abs().sum() > 0
        assert clip.instance_edges.sum() == 0


def test_plan_cuts_clips_and_groups_them_into_shards():
    from vid2vid.datasets.prepare import plan
    from vid2vid.datasets.sources import SequenceSpec

    specs = [SequenceSpec("train", "a b/c", 20), SequenceSpec("val", "short", 3)]
    cfg = DataConfig(resolution="64x32", clip_len=4, clip_stride=2, rows_per_shard=4)
    tasks, rejects = plan(specs, cfg)
    assert [t.starts for t in tasks] == [[0, 2, 4, 6], [8, 10, 12, 14], [16]]
    assert [t.first_clip for t in tasks] == [0, 4, 8]
    assert [t.path for t in tasks] == ["train/a_b_c-0000.parquet", "train/a_b_c-0001.parquet",
                                       "train/a_b_c-0002.parquet"]
    assert rejects[0].reason == "sequence shorter than a clip: 3 frames < clip_len 4"
    assert rejects[0].split == "val"
    # shard_mb caps clips per shard: one 4-frame 64x32 clip is 4 * 64 * 32 * 11 bytes = 88 KiB
    cfg.shard_mb, cfg.resolution = 1, "512x256"  # one clip is 5.5 MiB: still one clip per shard
    assert [len(t.starts) for t in plan(specs[:1], cfg)[0]] == [1] * 9
