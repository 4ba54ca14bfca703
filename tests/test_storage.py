"""Run folders and shards at a URI: ``file://`` through Ray Data, ``s3://`` against a local S3 endpoint.

The whole job (prepare, Ray Train checkpoints, run-id file, sample video, evaluation) at an ``s3://``
run_dir and data.out, on two nodes, is ``test_multinode.py``; here the pieces, quickly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from services import environ, s3_endpoint

from vid2vid import storage
from vid2vid.checkpoints import RUN_ID_FILE, read_run_id
from vid2vid.config import load_config
from vid2vid.datasets import shards
from vid2vid.datasets.prepare import prepare
from vid2vid.platform.tracking import Tracker, resolve_tracking_uri

SMOKE = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
         "data.rows_per_shard=1", "data.flow_actors=1"]


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    with s3_endpoint(tmp_path_factory.mktemp("s3")) as endpoint:
        yield endpoint


@pytest.fixture
def s3(s3_server):
    """The endpoint, with this process's S3 clients pointed at it for one test (not Ray's workers)."""
    with environ(s3_server.env):
        yield s3_server


def test_locations_keep_their_scheme_and_query():
    uri = "s3://bucket/runs?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.join(uri, "ray", "/x/") == "s3://bucket/runs/ray/x?endpoint_override=127.0.0.1:9000&scheme=http"
    assert storage.name(storage.join(uri, "ray", "x")) == "x"
    assert storage.parent("s3://bucket/runs/ray/x") == "s3://bucket/runs/ray"
    assert storage.normalize("gs://b/runs/") == "gs://b/runs"
    assert storage.is_local("file:///tmp/x") and storage.is_remote("s3://b/x") and storage.is_local("runs")
    assert storage.location_of(pafs.LocalFileSystem(), "/tmp/r/ckpt") == "/tmp/r/ckpt"
    s3fs = pafs.S3FileSystem(region="us-east-1", endpoint_override="127.0.0.1:1")
    assert storage.location_of(s3fs, "bucket/runs/ray/x/checkpoint_1") == "s3://bucket/runs/ray/x/checkpoint_1"


def test_local_only_state_says_so_or_moves_to_a_local_stand_in(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(storage.StorageError, match=r"train.run_dir=s3://b/runs .*MLflow server"):
        resolve_tracking_uri(None, "s3://b/runs")
    assert resolve_tracking_uri(None, f"file://{tmp_path}") == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(storage.StorageError, match="train.run_dir of a sweep must be a local folder"):
        storage.local_path("s3://b/runs", "train.run_dir of a sweep")
    from vid2vid.datasets.prepare import PrepareError

    with pytest.raises(PrepareError, match="data.source=s3://b/raw: sources are read from a local folder"):
        prepare(load_config([*SMOKE, "data.source=s3://b/raw", "data.source_kind=vid2vid"]).data)
    from vid2vid.datasets.labels import BadInput
    from vid2vid.generate.inputs import open_input

    with pytest.raises(BadInput, match="s3://b/shards: generation reads local files"):
        open_input("s3://b/shards", (64, 32), 35)
    # the offline journal of a run at a URI lives on this node, under the cache, one folder per URI
    with pytest.warns(RuntimeWarning, match="unreachable"):  # nothing listens there: the record is kept
        tracker = Tracker("http://127.0.0.1:1", "e", run_name="r", run_dir="s3://b/runs", key="r", retry_after_s=60)
    tracker.close()
    assert tracker.run_dir == tmp_path / "cache" / "vid2vid" / "runs" / "s3%3A%2F%2Fb%2Fruns"
    assert tracker.identity()["run_dir"] == "s3://b/runs"  # another node finds its own stand-in from it


def test_files_at_a_file_uri_and_at_s3(tmp_path, s3):
    for base in (f"file://{tmp_path}/a", s3.uri("a")):
        storage.write_text(storage.join(base, "x", "one.txt"), "1")
        storage.write_bytes(storage.join(base, "two.bin"), b"2")
        assert storage.read_text(storage.join(base, "x", "one.txt")) == "1"
        assert storage.list_files(base) == [storage.join(base, "two.bin"), storage.join(base, "x", "one.txt")]
        assert storage.list_files(base, suffix=".txt", recursive=False) == []
        assert storage.is_file(storage.join(base, "two.bin")) and not storage.exists(storage.join(base, "nope"))
        with pytest.raises(FileNotFoundError, match="nope"):
            storage.read_bytes(storage.join(base, "nope"))
        storage.delete_file(storage.join(base, "two.bin"))
        assert storage.list_files(base) == [storage.join(base, "x", "one.txt")]
    assert sorted(p.name for p in (tmp_path / "a").rglob("*")) == ["one.txt", "x"]  # no temporaries left


def test_shards_and_run_id_file_on_s3_read_back_like_local_ones(tmp_path, s3, monkeypatch):
    """Written with the same functions prepare uses, read with those training and evaluation use."""
    rng = np.random.default_rng(0)
    n, t, h, w = 2, 3, 8, 16
    cols = {"labels": rng.integers(0, 35, (n, t, h, w)).astype(np.uint8),
            "instance_edges": rng.integers(0, 2, (n, t, h, w)).astype(np.uint8),
            "instances": rng.integers(0, 9, (n, t, h, w)).astype(np.uint8),
            "frames": rng.integers(0, 256, (n, t, h, w, 3)).astype(np.uint8),
            "flow": rng.standard_normal((n, t, h, w, 2)).astype(np.float16),
            "confidence": rng.integers(0, 2, (n, t, h, w)).astype(np.uint8)}
    table = shards.clips_table(cols, "seq", [0, 3], [0, 1])
    out = s3.uri("shards")
    shards.write_shard(table, storage.join(out, "train/seq-0000.parquet"), {"v": 1})
    storage.write_bytes(storage.join(out, "train/.seq-0001.parquet.tmp-deadbeef"), b"half")  # a killed writer's
    shards.remove_temp_files(out)
    assert storage.list_files(out) == [storage.join(out, "train/seq-0000.parquet")]
    assert shards.shard_complete(storage.join(out, "train/seq-0000.parquet"), 2, {"v": 1})
    assert not shards.shard_complete(storage.join(out, "train/seq-0000.parquet"), 2, {"v": 2})
    with pytest.raises(shards.ShardError, match=r"s3://vid2vid/shards/manifest.json: no manifest"):
        shards.load_manifest(out)
    shards.write_manifest(out, {"schema_version": shards.SCHEMA_VERSION, "splits": {"train": {"has_frames": True}},
                                "shards": [{"path": "train/seq-0000.parquet", "split": "train"}]})
    assert shards.shard_paths(out) == [storage.join(out, "train/seq-0000.parquet")]
    (clip,) = [c for c in shards.iter_clips(out)][1:]
    np.testing.assert_array_equal(clip.labels[0].numpy(), cols["labels"][1])
    np.testing.assert_array_equal(clip.flow[0].numpy(), cols["flow"][1].astype(np.float32).transpose(0, 3, 1, 2))

    run_folder = s3.uri("runs", "ray", "r1")
    assert read_run_id(run_folder) is None
    from vid2vid.platform.journal import RunJournal

    RunJournal(tmp_path / "tracking", "r1").bind("abc123", storage.join(run_folder, RUN_ID_FILE))
    assert read_run_id(run_folder) == "abc123"


@pytest.mark.ray
def test_prepare_to_a_file_uri_then_ray_data_streams_the_same_clips(ray_cluster, tmp_path):
    """data.out=file://...: Ray Data's actors write the shards, a second prepare keeps them all, and the
    training dataset streams exactly the clips a plain-folder prepare gives."""
    uri = f"file://{tmp_path}/uri"
    first = prepare(load_config([*SMOKE, f"data.out={uri}"]).data, progress=False)
    again = prepare(load_config([*SMOKE, f"data.out={uri}"]).data, progress=False)
    prepare(load_config([*SMOKE, f"data.out={tmp_path / 'plain'}"]).data, progress=False)
    assert first.written == {"train": 4, "val": 4} and first.out == uri  # the smoke preset's synthetic val split
    assert again.written == {} and again.skipped_shards == len(shards.load_manifest(uri)["shards"]) == 8
    manifest = shards.load_manifest(uri)
    assert manifest == json.loads((tmp_path / "uri" / "manifest.json").read_text())
    assert manifest["splits"] == shards.load_manifest(tmp_path / "plain")["splits"]
    assert all(p.startswith(f"file://{tmp_path}/uri/train/") for p in shards.shard_paths(uri, split="train"))

    def clips(out):
        ds = shards.training_dataset(out, shuffle=False)
        rows = ds.take_all()
        return sorted((int(r["clip_index"]), r["labels"].tobytes(), r["flow"].tobytes()) for r in rows)

    got, want = clips(uri), clips(tmp_path / "plain")
    assert len(got) == 4 and got == want
    assert not list(Path(tmp_path / "uri").rglob(".*tmp-*"))


def test_a_resume_at_s3_is_checked_against_the_config_kept_there(tmp_path, s3, monkeypatch):
    """The run folder's config (resume.py) and a checkpoint named by URI (locate.py, checkpoints.py)
    are read from S3 itself, not from a ``Path`` that would turn ``s3://b/k`` into ``s3:/b/k``."""
    from vid2vid.checkpoints import CONFIG
    from vid2vid.checkpoints import load_config as checkpoint_config
    from vid2vid.config import ConfigError
    from vid2vid.errors import CheckpointError
    from vid2vid.platform.locate import locate_checkpoint
    from vid2vid.platform.resume import check_resume, previous_config, record_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    folder = s3.uri("runs", "ray", "r2")
    cfg = load_config(["preset=smoke", "train.lr=0.0002"])
    assert previous_config(folder) is None and check_resume(cfg, folder) == {}
    record_config(cfg, folder, {}, tracker=None)
    assert previous_config(folder)["train"]["lr"] == 0.0002
    assert check_resume(load_config(["preset=smoke", "train.lr=0.0002", "train.max_steps=3"]), folder) == {}
    with pytest.raises(ConfigError, match=r"run 'r2' exists .*train.lr: 0.0002 -> 0.001"):
        check_resume(load_config(["preset=smoke", "train.lr=0.001"]), folder)

    checkpoint = storage.join(folder, "checkpoint_000001")
    with pytest.raises(CheckpointError, match=r"no config.json there; a URI must name a checkpoint folder"):
        locate_checkpoint(checkpoint)
    kept = storage.read_text(storage.join(folder, "vid2vid-run-config.json"))
    storage.write_text(storage.join(checkpoint, CONFIG), kept)
    assert locate_checkpoint(checkpoint) == checkpoint
    assert checkpoint_config(checkpoint).train.lr == 0.0002
