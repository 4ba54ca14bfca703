"""The evaluation service: clip selection, the feature UDF, the weights policy, and end to end from a
tiny checkpoint through Ray Data actor pools into the training run in MLflow (SQLite in tmp_path).

I3D runs at its protocol input (16 x 224 x 224) so FVD is exercised too. ResNeXt is left out of the
Ray runs on purpose: a 2048-d Fréchet distance of 2 clips costs minutes of ``scipy.linalg.sqrtm``
on 2 CPUs; its UDF path is the same class as I3D's.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from vid2vid.config import EvalConfig, load_config, to_dict
from vid2vid.datasets.prepare import prepare
from vid2vid.datasets.shards import ShardError, iter_clips
from vid2vid.eval.clips import choose_split, encode_segment, plan_clips, read_segment, to_uint8_frames, warp_terms
from vid2vid.eval.extract import ExtractFeatures, feature_columns, frames_to_input
from vid2vid.eval.feature_nets import load_feature_net, save_random_weights
from vid2vid.eval.frechet import StreamingStats
from vid2vid.eval.preprocess import preprocess_clips
from vid2vid.eval.service import _resources, checkpoint_step, evaluate_checkpoint, resolve_target, select_nets
from vid2vid.eval.temporal import warping_error
from vid2vid.models.vid2vid import GeneratorSide, generate_sequence, prepare_inputs
from vid2vid.platform.tracking import Tracker
from vid2vid.platform.warm_start import load_generator

SMOKE = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4"]


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> Path:
    """2 synthetic sequences of 8 frames, stored as 4-frame clips (no val split)."""
    out = tmp_path_factory.mktemp("shards") / "smoke"
    prepare(load_config([*SMOKE, f"data.out={out}"]).data, progress=False)
    return out


@pytest.fixture(scope="module")
def i3d_weights(tmp_path_factory) -> Path:
    """Random I3D weights in the public format, marked random (He-scaled: features depend on the input)."""
    return save_random_weights("i3d", tmp_path_factory.mktemp("weights") / "rgb_imagenet.pt")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds); each test has its own run."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_checkpoint(root: Path, run_id: str, step: int | None = None) -> Path:
    """A tiny checkpoint laid out as the trainer does, without Ray Train: <run_dir>/ray/<run_name>/
    {mlflow_run_id.txt, checkpoint_000000/{config.json, generator/weights.pt[, vid2vid-checkpoint.json]}}."""
    cfg = load_config([*SMOKE, f"train.run_dir={root}"])
    ckpt = root / "ray" / "train-run" / "checkpoint_000000"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt.parent / "mlflow_run_id.txt").write_text(run_id)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    if step is not None:
        (ckpt / "vid2vid-checkpoint.json").write_text(json.dumps({"format": 1, "state": {"step": step}}))
    return ckpt


def make_run(root: Path, uri: str, step: int | None = None) -> tuple[Path, str, str]:
    """A finished 'training' run (one metric at step 0) in ``uri`` and its checkpoint."""
    tracker = Tracker(uri, "vid2vid", run_name="train-run", run_dir=root)
    tracker.log_metrics({"G/total": 1.0}, step=0)
    tracker.end()
    return make_checkpoint(root, tracker.run_id, step), tracker.run_id, uri


def run_metrics(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


def sequence_frames(shards: Path) -> dict[str, torch.Tensor]:
    """Each sequence's frames, rebuilt from its stored clips independently of the planner."""
    parts: dict[str, list] = {}
    for clip in iter_clips(shards, "train"):
        parts.setdefault(clip.sequence[0], []).append((int(clip.start[0]), clip.frames))
    return {s: torch.cat([f for _, f in sorted(p, key=lambda x: x[0])], dim=1) for s, p in parts.items()}


# ------------------------------------------------------------------------------------------------
# Without Ray work of their own


def test_choose_split_prefers_val_with_frames():
    assert choose_split({"splits": {"train": {"has_frames": True}, "val": {"has_frames": True}}}) == "val"
    assert choose_split({"splits": {"train": {"has_frames": True}, "val": {"has_frames": False}}}) == "train"
    with pytest.raises(ShardError, match="no 'val' or 'train' split with real frames"):
        choose_split({"splits": {"test": {"has_frames": False}}})


def test_plan_stitches_consecutive_clips_of_one_sequence(shards, caplog):
    seqs = sequence_frames(shards)
    assert {tuple(f.shape[:2]) for f in seqs.values()} == {(1, 8)}
    plan = plan_clips(shards, num_clips=10, clip_len=8)  # 4-frame shard clips joined in pairs
    assert (plan.split, plan.frames, plan.available, len(plan.segments)) == ("train", 8, 2, 2)
    got = sorted(to_uint8_frames(read_segment(encode_segment(s)).frames).tobytes() for s in plan.segments)
    assert got == sorted(to_uint8_frames(f).tobytes() for f in seqs.values())
    # 3-frame segments: [0, 3) and [3, 6) of each sequence; the second crosses a stored-clip boundary
    plan3 = plan_clips(shards, num_clips=10, clip_len=3)
    assert (plan3.available, len(plan3.segments)) == (4, 4)
    crossing = [s for s in plan3.segments if len(s) == 2]
    assert [[(p.offset, p.length) for p in s] for s in crossing] == [[(3, 1), (0, 2)]] * 2
    seg = read_segment(encode_segment(crossing[0]))
    assert any(torch.equal(seg.frames, f[:, 3:6]) for f in seqs.values())
    assert float(seg.confidence[0, 1].sum()) == 0 < float(seg.confidence[0, 2].sum()), "no flow across a stitch"
    assert len(plan_clips(shards, num_clips=1, clip_len=3).segments) == 1
    with caplog.at_level(logging.WARNING, logger="vid2vid.eval"):  # longer than any sequence
        assert plan_clips(shards, num_clips=2, clip_len=16).frames == 8
    assert "eval.clip_len=16" in caplog.text


def test_clip_weights_reproduce_the_warping_error_of_all_clips():
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 4, 3, 8, 8, generator=g) * 2 - 1
    flow = torch.randn(3, 4, 2, 8, 8, generator=g)
    conf = (torch.rand(3, 4, 1, 8, 8, generator=g) > 0.3).float()
    conf[2] = 0  # a clip without any reliable flow weighs nothing

    class C:
        pass

    clip = C()
    clip.flow, clip.confidence = flow, conf
    terms = [warp_terms(frames, clip, i) for i in range(3)]
    assert terms[2] == (0.0, 0.0)
    mean = sum(e * m for e, m in terms) / sum(m for _, m in terms)
    assert mean == pytest.approx(warping_error(frames, flow, conf), rel=1e-6)


def test_weights_policy(tmp_path, i3d_weights, caplog):
    with caplog.at_level(logging.WARNING, logger="vid2vid.eval"):
        nets, skipped = select_nets(EvalConfig())
    assert nets == {} and set(skipped) == {"eval/fid_i3d", "eval/fvd", "eval/fid_resnext"}
    assert "eval.i3d_weights=/path/to/rgb_imagenet.pt" in caplog.text
    assert "eval.resnext_weights=/path/to/resnext-101-kinetics.pth" in caplog.text
    with pytest.raises(ValueError, match="random test weights.*eval.allow_random_weights=true"):
        select_nets(EvalConfig(i3d_weights=str(i3d_weights)))
    with pytest.raises(ValueError, match="test-only switch"):
        select_nets(EvalConfig(), input_sizes={"resnext101": 64})
    nets, skipped = select_nets(EvalConfig(i3d_weights=str(i3d_weights), allow_random_weights=True),
                                input_sizes={"i3d": 112})
    assert nets["i3d"].random and nets["i3d"].size == 112 and len(nets["i3d"].sha256) == 64
    assert "at least 193px" in skipped["eval/fvd"], "no FVD below the public logits window"


def test_run_target_from_the_checkpoint_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ckpt = make_checkpoint(tmp_path / "runs", "f00d", step=12)
    cfg = load_config([*SMOKE, "train.run_dir=elsewhere"])
    target = resolve_target(ckpt, cfg)  # the trainer's default store of the run_dir holding the checkpoint
    assert (target.run_id, target.tracking_uri) == ("f00d", f"sqlite:///{(tmp_path / 'runs').resolve()}/mlflow.db")
    assert resolve_target(ckpt, cfg, run_id="abc", tracking_uri="http://head:5000").run_id == "abc"
    assert checkpoint_step(ckpt) == 12 and checkpoint_step(ckpt, 3) == 3
    with pytest.raises(FileNotFoundError, match="pass step=N"):
        checkpoint_step(tmp_path)


def test_feature_udf_skips_cached_real_rows_and_drops_frames(i3d_weights):
    """Numerical agreement with the bare net is checked end to end (the cached real statistics)."""
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 40, 60, 3), dtype=np.uint8)
    batch = {"kind": np.array(["real", "fake"]), "index": np.array([0, 0]), "frames": frames}
    udf = ExtractFeatures("i3d", str(i3d_weights), 224, skip_real=True, drop_frames=True, expect_random=True)
    out = udf(batch)
    assert "frames" not in out and out["index"].tolist() == [0, 0] and out["i3d_valid"].tolist() == [False, True]
    assert out["i3d"].shape == (2, 1024) and out["i3d_logits"].shape == (2, 400)
    assert not out["i3d"][0].any() and not out["i3d_logits"][0].any() and out["i3d"][1].any()
    with pytest.raises(RuntimeError, match="random-weights marker"):
        ExtractFeatures("i3d", str(i3d_weights), 224, skip_real=True, drop_frames=True, expect_random=False)
    assert feature_columns("i3d", 112) == ["i3d"] and feature_columns("resnext101", 112) == ["resnext101"]
    x = frames_to_input(frames[:1], "resnext101", 64)
    assert tuple(x.shape) == (1, 3, 16, 64, 64)
    full = frames_to_input(frames[:1], "resnext101", 112)
    assert float(x.mean()) == pytest.approx(float(full.mean()), abs=1.0), "resizing keeps the value range"


# ------------------------------------------------------------------------------------------------
# End to end on Ray


@pytest.mark.ray
def test_pools_share_a_cluster_smaller_than_the_pools(ray_cluster):
    assert _resources(3, None, None) == (1, pytest.approx(2 / 3), 0.0)  # 2 CPUs, generator + 2 nets
    assert _resources(2, None, None) == (1, 1.0, 0.0)
    assert _resources(3, 2, 0.25) == (2, 0.25, 0.0)


def independent_reference(ckpt: Path, shards: Path, frames: int) -> tuple[float, float, torch.Tensor]:
    """Warping errors (generated, real) and the real clips, computed in-process without the service."""
    cfg, gen = load_generator(ckpt)
    fakes, reals, flows, confs = [], [], [], []
    for seq in sorted(sequence_frames(shards)):  # each whole sequence, rebuilt from its stored clips
        parts = sorted((c for c in iter_clips(shards, "train") if c.sequence[0] == seq), key=lambda c: int(c.start[0]))
        cat = {f: torch.cat([getattr(p, f) for p in parts], dim=1)[:, :frames]
               for f in ("labels", "instance_edges", "frames", "flow", "confidence")}
        with torch.no_grad():
            inputs = prepare_inputs(cfg.model, cat["labels"], cat["instance_edges"])
            fakes.append(generate_sequence(gen, cfg.model, inputs).frames)
        reals.append(cat["frames"])
        flows.append(cat["flow"])
        confs.append(cat["confidence"])
    fake, real, flow, conf = (torch.cat(x) for x in (fakes, reals, flows, confs))
    return warping_error(fake, flow, conf), warping_error(real, flow, conf), real


@pytest.mark.ray
def test_service_logs_random_weight_metrics_into_the_training_run(shards, i3d_weights, store, tmp_path):
    ckpt, run_id, uri = make_run(tmp_path, store)
    ev = EvalConfig(i3d_weights=str(i3d_weights), allow_random_weights=True, num_clips=2, clip_len=8, batch_size=2)
    res = evaluate_checkpoint(ckpt, shards, ev, step=7, tracking_uri=uri)  # default resources: 1 CPU x 2 pools
    assert res.run_id == run_id, "the run id comes from mlflow_run_id.txt beside the checkpoints"
    assert (res.split, res.num_clips, res.clip_frames, res.real_clips_extracted) == ("train", 2, 8, 2)

    history = run_metrics(uri, run_id)
    assert {"random_weights/eval/fid_i3d", "random_weights/eval/fvd", "eval/warping_error"} <= set(history)
    assert not [k for k in history if k.startswith(("eval/fid", "eval/fvd")) or "resnext" in k]
    for key in ("random_weights/eval/fid_i3d", "random_weights/eval/fvd", "eval/warping_error"):
        assert [s for s, _ in history[key]] == [7] and np.isfinite(history[key][0][1])
    assert history["random_weights/eval/fid_i3d"][0][1] > 1e-3, "an untrained generator is far from real video"
    assert history["random_weights/eval/fvd"][0][1] > 1e-3
    assert history["G/total"] == [(0, 1.0)], "the training run's own metrics are untouched"
    run = mlflow.tracking.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED", "evaluating a finished run leaves it finished"
    tags = run.data.tags
    assert "not comparable" in tags["eval/random_weights"] and tags["eval/split"] == "train"
    assert "eval.resnext_weights=/path/to/resnext-101-kinetics.pth" in tags["eval/skipped/fid_resnext"]

    # Warping errors against an in-process generation of the same two 8-frame sequences.
    fake_err, real_err, real = independent_reference(ckpt, shards, 8)
    assert history["eval/warping_error"][0][1] == pytest.approx(fake_err, rel=1e-4)
    assert history["eval/warping_error_real"][0][1] == pytest.approx(real_err, rel=1e-4)
    assert real_err < fake_err, "an untrained generator flickers more than real video"

    # Cached real statistics equal the bare net's features of the real clips.
    cached = sorted((tmp_path / "eval_stats").glob("*.npz"))
    assert len(cached) == 2 and {("i3d_logits" in p.name) for p in cached} == {True, False}
    net = load_feature_net("i3d", i3d_weights)
    with torch.no_grad():
        feats = net.extract(preprocess_clips(torch.from_numpy(to_uint8_frames(real)).permute(0, 1, 4, 2, 3)
                                             .float() / 127.5 - 1, "i3d"))
    want = StreamingStats().update(feats).finalize()
    stats = np.load(next(p for p in cached if "i3d_logits" not in p.name))
    np.testing.assert_allclose(stats["mean"], want.mean, rtol=1e-4, atol=1e-7)
    assert int(stats["count"]) == 2


@pytest.mark.ray
def test_without_weight_files_no_fid_and_the_cli_says_which_file(shards, store, tmp_path, capsys, caplog):
    from vid2vid.cli import main

    assert main(["evaluate", f"shards={shards}"]) == 2
    ckpt, run_id, uri = make_run(tmp_path, store)
    with caplog.at_level(logging.WARNING, logger="vid2vid.eval"):
        rc = main(["evaluate", f"checkpoint={ckpt}", f"shards={shards}", "step=3", f"tracking_uri={uri}",
                   "num_clips=2", "clip_len=8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "not computed: eval/fid_i3d" in out and "eval.i3d_weights=/path/to/rgb_imagenet.pt" in out
    assert "eval.resnext_weights=/path/to/resnext-101-kinetics.pth" in caplog.text
    history = run_metrics(uri, run_id)
    assert not [k for k in history if "fid" in k or "fvd" in k]
    assert [s for s, _ in history["eval/warping_error"]] == [3]
    assert "rgb_imagenet.pt" in mlflow.tracking.MlflowClient(uri).get_run(run_id).data.tags["eval/skipped/fid_i3d"]


@pytest.mark.ray
def test_evaluator_actor_beside_training(shards, store, tmp_path):
    import ray.train

    from vid2vid.platform.evaluation import start_evaluator

    ckpt, run_id, uri = make_run(tmp_path, store, step=5)
    cfg = load_config([*SMOKE, "eval.num_clips=2", "eval.clip_len=8"])
    handle = start_evaluator(cfg, shards, tracking_uri=uri, cpus_per_actor=0.5)
    # Ray Train's controller calls the callback with each persisted checkpoint; it only enqueues.
    handle.callback().after_report(None, [{"step": 5}], ray.train.Checkpoint.from_directory(str(ckpt)))
    assert handle.callback().after_report(None, [{"step": 6}], None) is None  # a report without a checkpoint
    assert ray.get(handle.submit(tmp_path / "not-a-checkpoint", 9)) is False
    results = handle.wait(timeout_s=120)
    report = handle.report()
    assert [r.step for r in results] == [5] and report["pending"] == 0
    assert any("not-a-checkpoint" in e for e in report["errors"])
    history = run_metrics(uri, run_id)
    assert [s for s, _ in history["eval/warping_error"]] == [5]
