"""Shard files: Arrow schema, atomic writes, completeness, manifest, Clip, and the training Ray Dataset."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vid2vid.config import DataConfig
from vid2vid.datasets import shards
from vid2vid.datasets.shards import Clip, ShardError

SETTINGS = {"clip_len": 3, "resolution": [8, 4]}


def random_clips(n=2, t=3, h=4, w=8, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "labels": rng.integers(0, 35, (n, t, h, w)).astype(np.uint8),
        "instance_edges": rng.integers(0, 2, (n, t, h, w)).astype(np.uint8),
        "instances": rng.integers(0, 255, (n, t, h, w)).astype(np.uint8),
        "frames": rng.integers(0, 256, (n, t, h, w, 3)).astype(np.uint8),
        "flow": (rng.standard_normal((n, t, h, w, 2)) * 5).astype(np.float16),
        "confidence": rng.integers(0, 2, (n, t, h, w)).astype(np.uint8),
    }


def test_round_trip_keeps_types_shapes_and_values(tmp_path):
    cols = random_clips()
    table = shards.clips_table(cols, "seqA", [0, 3], [0, 1])
    path = tmp_path / "train" / "seqA-0000.parquet"
    shards.write_shard(table, path, SETTINGS)
    assert [p.name for p in path.parent.iterdir()] == ["seqA-0000.parquet"]  # no temporaries left
    f = pq.ParquetFile(path)
    assert f.metadata.num_row_groups == 2  # one clip per row group
    schema = f.schema_arrow
    assert isinstance(schema.field("frames").type, pa.FixedShapeTensorType)
    assert schema.field("frames").type.shape == [3, 4, 8, 3]
    assert schema.field("flow").type.value_type == pa.float16()
    back = shards.table_to_numpy(pq.read_table(path))
    for name, arr in cols.items():
        assert back[name].dtype == arr.dtype
        np.testing.assert_array_equal(back[name], arr)
    assert list(back["sequence"]) == ["seqA", "seqA"] and list(back["start"]) == [0, 3]
    one = shards.table_to_numpy(f.read_row_group(1))
    np.testing.assert_array_equal(one["labels"][0], cols["labels"][1])


def test_failed_write_leaves_nothing_visible(tmp_path, monkeypatch):
    table = shards.clips_table(random_clips(), "s", [0, 3], [0, 1])

    def crash(tbl, where, **kw):
        open(where, "wb").write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(shards.pq, "write_table", crash)
    with pytest.raises(OSError, match="disk full"):
        shards.write_shard(table, tmp_path / "x.parquet", SETTINGS)
    assert list(tmp_path.iterdir()) == []


def test_shard_complete_checks_rows_settings_and_integrity(tmp_path):
    path = tmp_path / "s.parquet"
    assert not shards.shard_complete(path, 2, SETTINGS)
    shards.write_shard(shards.clips_table(random_clips(), "s", [0, 3], [0, 1]), path, SETTINGS)
    assert shards.shard_complete(path, 2, SETTINGS)
    assert not shards.shard_complete(path, 3, SETTINGS)
    assert not shards.shard_complete(path, 2, {**SETTINGS, "clip_len": 4})
    path.write_bytes(path.read_bytes()[:-100])
    assert not shards.shard_complete(path, 2, SETTINGS)


def test_clip_from_batch_layout_and_scaling():
    cols = random_clips(n=2, t=3)
    cols["frames"][0, 0, 0, 0] = [0, 255, 51]
    clip = Clip.from_batch({**cols, "start": np.array([0, 3]), "sequence": np.array(["a", "b"], object)})
    assert clip.labels.dtype == torch.long and clip.labels.shape == (2, 3, 4, 8)
    assert clip.instance_edges.dtype == torch.float32 and clip.instances.dtype == torch.long
    assert clip.frames.shape == (2, 3, 3, 4, 8) and clip.flow.shape == (2, 3, 2, 4, 8)
    assert clip.confidence.shape == (2, 3, 1, 4, 8) and clip.flow.dtype == torch.float32
    assert clip.frames[0, 0, :, 0, 0].tolist() == pytest.approx([-1.0, 1.0, 51 / 127.5 - 1])
    np.testing.assert_array_equal(clip.flow[1, 2, 1].numpy(), cols["flow"][1, 2, :, :, 1].astype(np.float32))
    assert clip.sequence == ["a", "b"]
    # torch input (what iter_torch_batches yields) gives the same
    same = Clip.from_batch({k: torch.from_numpy(v) for k, v in cols.items()})
    assert torch.equal(same.frames, clip.frames) and torch.equal(same.labels, clip.labels)
    # labels-only batch
    lab = Clip.from_batch({k: cols[k] for k in ("labels", "instance_edges", "instances")})
    assert lab.frames is None and lab.flow is None and lab.confidence is None


def test_clip_slice():
    clip = Clip.from_batch({**random_clips(t=5), "start": np.array([0, 5])})
    part = clip.slice(1, 3)
    assert part.num_frames == 3 and part.frames.shape[1] == 3
    assert torch.equal(part.flow, clip.flow[:, 1:4]) and torch.equal(part.labels, clip.labels[:, 1:4])
    assert part.start.tolist() == [1, 6]
    with pytest.raises(ValueError, match=r"Clip.slice\(3, 3\) is outside a clip of 5 frames"):
        clip.slice(3, 3)


def test_manifest_errors_name_the_folder(tmp_path):
    with pytest.raises(ShardError, match="no manifest; prepare the data first"):
        shards.load_manifest(tmp_path)
    shards.write_manifest(tmp_path, {"schema_version": 999, "splits": {}, "shards": []})
    with pytest.raises(ShardError, match="schema_version 999"):
        shards.load_manifest(tmp_path)
    shards.write_manifest(tmp_path, {"schema_version": shards.SCHEMA_VERSION,
                                     "splits": {"test": {"clips": 1, "has_frames": False}},
                                     "shards": [{"path": "test/a.parquet", "split": "test"}]})
    with pytest.raises(ShardError, match="no split 'train'; it has \\['test'\\]"):
        shards.shard_paths(tmp_path, "train")
    with pytest.raises(ShardError, match="a.parquet: listed in the manifest but missing"):
        shards.shard_paths(tmp_path, "test")
    with pytest.raises(ShardError, match="labels only"):
        shards.training_dataset(tmp_path, "test")


@pytest.mark.ray
def test_synthetic_prepare_and_training_dataset(tmp_path, ray_cluster):
    """Synthetic scenes keep their EXACT flow; the training dataset streams every clip, shuffled."""
    from vid2vid.datasets.prepare import prepare
    from vid2vid.datasets.synthetic import make_dataset

    cfg = DataConfig(source="synthetic", out=str(tmp_path), resolution="64x32", clip_len=3, clip_stride=2,
                     synthetic_sequences=2, synthetic_frames=6, seed=7)
    summary = prepare(cfg, progress=False)
    assert summary.clips == {"train": 4}  # starts 0 and 2 per sequence (4 + 3 > 6 stops at 2)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["flow"]["estimator"] == "exact" and manifest["label_nc"] == 35

    ref = {s.name: s for s in make_dataset(2, 6, 64, 32, seed=7)}
    clips = list(shards.iter_clips(tmp_path))
    assert len(clips) == 4
    for clip in clips:
        seq, s = ref[clip.sequence[0]], int(clip.start[0])
        np.testing.assert_array_equal(clip.labels[0].numpy(), seq.labels[s:s + 3])
        exact = torch.from_numpy(seq.flow[s + 1:s + 3]).permute(0, 3, 1, 2)
        torch.testing.assert_close(clip.flow[0, 1:], exact, atol=0.02, rtol=1e-3)  # float16 storage
        assert torch.equal(clip.confidence[0, 1:, 0], torch.from_numpy(seq.valid[s + 1:s + 3]).float())
        assert clip.flow[0, 0].abs().max() == 0 and clip.confidence[0, 0].max() == 0

    def order(seed):
        ds = shards.training_dataset(tmp_path, shuffle_seed=seed)
        out = []
        for batch in ds.iter_torch_batches(batch_size=1):
            clip = Clip.from_batch(batch)
            assert clip.frames.shape == (1, 3, 3, 32, 64) and clip.frames.min() >= -1
            assert clip.flow.dtype == torch.float32 and clip.sequence is None
            out.append((int(clip.clip_index), int(clip.start), int(clip.labels.sum())))
        return out

    first, again = order(1), order(1)
    assert first == again  # a seed fixes the order
    expected = sorted((int(c.clip_index), int(c.start), int(c.labels.sum())) for c in clips)
    assert sorted(first) == expected  # every clip exactly once


def test_model_must_fit_the_shards_source_channels():
    from vid2vid.config import ModelConfig

    dense = {"label_nc": 0, "input_nc": 6}
    shards.check_model_fits(ModelConfig(label_nc=0, input_nc=6), dense, "s")
    with pytest.raises(ValueError, match=r"s/manifest.json: label_nc is 0 but model.label_nc is 35; "
                                         r"set model.label_nc=0"):
        shards.check_model_fits(ModelConfig(), dense, "s")
    with pytest.raises(ValueError, match=r"input_nc is 6 but model.input_nc is 1; set model.input_nc=6"):
        shards.check_model_fits(ModelConfig(label_nc=0, input_nc=1), dense, "s")
    with pytest.raises(ValueError, match=r"input_nc is 6 but model.input_nc is 1; evaluate elsewhere$"):
        shards.check_model_fits(ModelConfig(label_nc=0, input_nc=1), dense, "s", advice="evaluate elsewhere")
