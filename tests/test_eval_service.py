"""The evaluation service: the val split, clip selection, the weights policy, and end to end from a tiny
checkpoint through the Ray Data actor pool into the training run in MLflow (SQLite in tmp_path).

I3D's FVD input stays at the protocol's 16 x 224 x 224 (so FVD and the StyleGAN-V TorchScript path
run for real); the FID inputs are shrunk (a test-only switch) to keep CPU time down.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from vid2vid.checkpoints import checkpoint_step, load_generator
from vid2vid.config import EvalConfig, load_config, to_dict
from vid2vid.datasets.flow import FlowEstimator
from vid2vid.datasets.prepare import prepare
from vid2vid.datasets.shards import ShardError, iter_clips
from vid2vid.eval.clips import choose_split, encode_segment, plan_clips, read_segment, to_uint8_frames, warp_terms
from vid2vid.eval.feature_nets import load_feature_net, save_random_weights
from vid2vid.eval.frechet import GaussianStats, StreamingStats, frechet_distance
from vid2vid.eval.metric_utils import FeatureExtractor, frames_to_input
from vid2vid.eval.service import _pool, evaluate_checkpoint, select_nets
from vid2vid.eval.temporal import warping_error
from vid2vid.eval.worker import style_seed_of
from vid2vid.generate.styles import StyleBank, StyleSampler
from vid2vid.models.vid2vid import GeneratorSide, generate_sequence, prepare_inputs
from vid2vid.platform.eval_records import resolve_target
from vid2vid.platform.evaluation import evaluate_and_log
from vid2vid.platform.tracking import Tracker

# 2 training sequences and 2 unseen validation sequences (the smoke preset's synthetic_val_sequences)
SMOKE = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4"]
SIZES = {"i3d": 64, "resnext101": 64}  # FID inputs shrunk; the FVD input stays 224


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> Path:
    """2 + 2 synthetic sequences of 8 frames, stored as 4-frame clips, in train and val splits."""
    out = tmp_path_factory.mktemp("shards") / "smoke"
    prepare(load_config([*SMOKE, f"data.out={out}"]).data, progress=False)
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    """Random weights in the three public formats, marked random."""
    root = tmp_path_factory.mktemp("weights")
    return {"i3d": save_random_weights("i3d", root / "rgb_imagenet.pt"),
            "i3d_styleganv": save_random_weights("i3d_styleganv", root / "i3d_torchscript.pt"),
            "resnext101": save_random_weights("resnext101", root / "resnext-101-kinetics.pth")}


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite tracking store for the module (creating one costs seconds); each test has its own run."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def make_checkpoint(root: Path, run_id: str, step: int | None = None, extra: tuple[str, ...] = ()) -> Path:
    """A tiny checkpoint laid out as the trainer does, without Ray Train: <run_dir>/ray/<run_name>/
    {mlflow_run_id.txt, checkpoint_000000/{config.json, generator/weights.pt[, vid2vid-checkpoint.json]}}."""
    cfg = load_config([*SMOKE, f"train.run_dir={root}", *extra])
    ckpt = root / "ray" / "train-run" / "checkpoint_000000"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt.parent / "mlflow_run_id.txt").write_text(run_id)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    if step is not None:
        (ckpt / "vid2vid-checkpoint.json").write_text(json.dumps({"format": 1, "state": {"step": step}}))
    return ckpt


def make_run(root: Path, uri: str, step: int | None = None, extra: tuple[str, ...] = ()) -> tuple[Path, str, str]:
    """A finished 'training' run (one metric at step 0) in ``uri`` and its checkpoint."""
    tracker = Tracker(uri, "vid2vid", run_name="train-run", run_dir=root)
    tracker.log_metrics({"G/total": 1.0}, step=0)
    tracker.end()
    return make_checkpoint(root, tracker.run_id, step, extra), tracker.run_id, uri


def run_metrics(uri: str, run_id: str) -> dict[str, list[tuple[int, float]]]:
    client = mlflow.tracking.MlflowClient(uri)
    run = client.get_run(run_id)
    return {k: sorted((m.step, m.value) for m in client.get_metric_history(run_id, k)) for k in run.data.metrics}


def sequence_frames(shards: Path, split: str) -> dict[str, dict[str, torch.Tensor]]:
    """Each sequence's whole clip (every column), rebuilt from its stored clips independently of the planner."""
    parts: dict[str, list] = {}
    for clip in iter_clips(shards, split):
        parts.setdefault(clip.sequence[0], []).append(clip)
    out = {}
    for seq, clips in sorted(parts.items()):
        clips.sort(key=lambda c: int(c.start[0]))
        out[seq] = {f: torch.cat([getattr(c, f) for c in clips], dim=1)
                    for f in ("labels", "instance_edges", "instances", "frames", "flow", "confidence")}
    return out


def generate(gen, cfg, seq: dict[str, torch.Tensor], features=None) -> torch.Tensor:
    with torch.no_grad():
        return generate_sequence(gen, cfg.model, prepare_inputs(cfg.model, seq["labels"], seq["instance_edges"],
                                                                features)).frames


def tof_by_hand(fake: torch.Tensor, real: torch.Tensor) -> tuple[float, int]:
    """TecoGAN's tOF with DIS on both videos (synthetic shards hold exact flows, not DIS ones)."""
    dis = FlowEstimator("dis")
    f, r = to_uint8_frames(fake)[0], to_uint8_frames(real)[0]
    diffs = [np.linalg.norm(dis(f[t], f[t - 1]) - dis(r[t], r[t - 1]), axis=-1).mean() for t in range(1, len(f))]
    return float(np.sum(diffs)), len(diffs)


# ------------------------------------------------------------------------------------------------
# Without Ray work of their own


def test_the_val_split_is_the_default_and_training_clips_only_on_request():
    both = {"splits": {"train": {"has_frames": True}, "val": {"has_frames": True}}}
    assert choose_split(both) == "val" and choose_split(both, "train") == "train"
    with pytest.raises(ShardError, match=r"no 'val' split with real frames .*data.val_source=.*data.val_sequences="
                                         r".*data.val_fraction=0.1.*eval.split=train"):
        choose_split({"splits": {"train": {"has_frames": True}, "val": {"has_frames": False}}})
    with pytest.raises(ShardError, match="no 'train' split with real frames"):
        choose_split({"splits": {"test": {"has_frames": False}}}, "train")


def test_plan_stitches_consecutive_clips_of_one_sequence(shards, caplog):
    seqs = {s: v["frames"] for s, v in sequence_frames(shards, "val").items()}
    assert len(seqs) == 2 and {tuple(f.shape[:2]) for f in seqs.values()} == {(1, 8)}
    plan = plan_clips(shards, num_clips=0, clip_len=8)  # all of the val split; 4-frame clips joined in pairs
    assert (plan.split, plan.frames, plan.available, len(plan.segments)) == ("val", 8, 2, 2)
    got = sorted(to_uint8_frames(read_segment(encode_segment(s)).frames).tobytes() for s in plan.segments)
    assert got == sorted(to_uint8_frames(f).tobytes() for f in seqs.values())
    assert {p.path.split("/")[-2] for s in plan.segments for p in s} == {"val"}
    # 3-frame segments: [0, 3) and [3, 6) of each sequence; the second crosses a stored-clip boundary
    plan3 = plan_clips(shards, num_clips=0, clip_len=3)
    assert (plan3.available, len(plan3.segments)) == (4, 4)
    crossing = [s for s in plan3.segments if len(s) == 2]
    assert [[(p.offset, p.length) for p in s] for s in crossing] == [[(3, 1), (0, 2)]] * 2
    seg = read_segment(encode_segment(crossing[0]))
    assert any(torch.equal(seg.frames, f[:, 3:6]) for f in seqs.values())
    assert float(seg.confidence[0, 1].sum()) == 0 < float(seg.confidence[0, 2].sum()), "no flow across a stitch"
    assert len(plan_clips(shards, num_clips=1, clip_len=3).segments) == 1
    assert plan_clips(shards, num_clips=0, clip_len=8, split="train").split == "train"
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


def test_weights_policy(weights, caplog):
    with caplog.at_level(logging.WARNING, logger="vid2vid.eval"):
        nets, skipped = select_nets(EvalConfig())
    assert nets == {} and set(skipped) == {"eval/fid_i3d", "eval/fvd", "eval/fvd_styleganv", "eval/fid_resnext"}
    assert "eval.i3d_weights=auto" in caplog.text and "eval.i3d_weights=/path/to/rgb_imagenet.pt" in caplog.text
    assert "eval.resnext_weights=/path/to/resnext-101-kinetics.pth" in caplog.text
    with pytest.raises(ValueError, match="random test weights.*eval.allow_random_weights=true"):
        select_nets(EvalConfig(i3d_weights=str(weights["i3d"])))
    with pytest.raises(ValueError, match="test-only switch"):
        select_nets(EvalConfig(), input_sizes={"resnext101": 64})
    nets, skipped = select_nets(EvalConfig(i3d_weights=str(weights["i3d"]), allow_random_weights=True),
                                input_sizes={"fvd": 112})
    assert nets["i3d"].random and len(nets["i3d"].sha256) == 64
    assert "at least 193px" in skipped["eval/fvd"], "no FVD below the public logits window"
    # a download that fails is a skipped metric with the reason, not a crash
    url = f"{(weights['i3d'].parent / 'absent.pt').as_uri()}#sha256={'0' * 64}"
    nets, skipped = select_nets(EvalConfig(resnext_weights=url, allow_random_weights=True))
    assert "resnext101" not in nets and "cannot download" in skipped["eval/fid_resnext"]


def test_one_net_pass_per_input_and_the_protocols_inputs(weights):
    frames = np.random.default_rng(0).integers(0, 256, size=(2, 5, 40, 80, 3), dtype=np.uint8)
    fx = FeatureExtractor({n: str(p) for n, p in weights.items() if n != "i3d_styleganv"},
                          ["fid_i3d", "fvd", "fid_resnext"], sizes=SIZES)
    calls = []
    trunk = fx.nets["i3d"].trunk
    fx.nets["i3d"].trunk = lambda x: calls.append(tuple(x.shape)) or trunk(x)
    out = fx(frames)
    assert {k: v.shape for k, v in out.items()} == {"fid_i3d": (2, 1024), "fvd": (2, 400), "fid_resnext": (2, 2048)}
    assert sorted(calls) == [(2, 3, 16, 64, 64), (2, 3, 16, 224, 224)], "I3D once per input: FID crop, FVD whole"
    net = load_feature_net("i3d", weights["i3d"])
    with torch.no_grad():
        fvd = net(frames_to_input(frames, "fvd")).mean(dim=2)
    np.testing.assert_allclose(out["fvd"], fvd.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.ray
def test_pool_sizes(ray_cluster):
    assert _pool(None, None) == (1, 2, 1.0, 0.0)  # 2 CPUs: up to 2 single-threaded actors, starting with 1
    assert _pool(None, 0.5) == (1, 4, 0.5, 0.0)
    assert _pool(1, 0.5) == (1, 1, 0.5, 0.0)


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


# ------------------------------------------------------------------------------------------------
# End to end on Ray


@pytest.mark.ray
def test_service_logs_every_metric_with_clips_and_interval_into_the_training_run(shards, weights, store, tmp_path):
    ckpt, run_id, uri = make_run(tmp_path, store)
    ev = EvalConfig(i3d_weights=str(weights["i3d"]), styleganv_i3d_weights=str(weights["i3d_styleganv"]),
                    resnext_weights=str(weights["resnext101"]), allow_random_weights=True, num_clips=0, clip_len=8,
                    batch_size=2, bootstrap=100)
    res = evaluate_and_log(ckpt, shards, ev, step=7, tracking_uri=uri, input_sizes=SIZES)
    assert res.run_id == run_id, "the run id comes from mlflow_run_id.txt beside the checkpoints"
    assert (res.split, res.num_clips, res.clip_frames, res.real_clips_extracted) == ("val", 2, 8, 2)

    history = run_metrics(uri, run_id)
    names = ["fid_i3d", "fvd", "fvd_styleganv", "fid_resnext"]
    for name in names:
        key = f"random_weights/eval/{name}"
        for k in (key, f"{key}/clips", f"{key}/ci95_low", f"{key}/ci95_high"):
            assert [s for s, _ in history[k]] == [7] and np.isfinite(history[k][0][1]), k
        assert history[f"{key}/clips"][0][1] == 2
        assert history[key][0][1] > 1e-3, "an untrained generator is far from real video"
    assert not [k for k in history if k.startswith("eval/f")], "random weights never log as eval/fid or eval/fvd"
    assert history["G/total"] == [(0, 1.0)], "the training run's own metrics are untouched"
    run = mlflow.tracking.MlflowClient(uri).get_run(run_id)
    assert run.info.status == "FINISHED", "evaluating a finished run leaves it finished"
    tags = run.data.tags
    assert "not comparable" in tags["eval/random_weights"] and tags["eval/split"] == "val"
    assert "synthetic_val_sequences" in tags["eval/split_origin"] and "eval/on_training_clips" not in tags
    assert "2 clips < 2048 feature dimensions" in tags["eval/small_n/fid_resnext"]
    assert "whole frame 224^2 TF bilinear" in tags["eval/protocol"]

    # Against an in-process generation of the two 8-frame validation sequences.
    cfg, gen = load_generator(ckpt)
    seqs = sequence_frames(shards, "val")
    fakes = {s: generate(gen, cfg, v) for s, v in seqs.items()}
    fake, real = torch.cat(list(fakes.values())), torch.cat([v["frames"] for v in seqs.values()])
    flow, conf = torch.cat([v["flow"] for v in seqs.values()]), torch.cat([v["confidence"] for v in seqs.values()])
    assert history["eval/warping_error"][0][1] == pytest.approx(warping_error(fake, flow, conf), rel=1e-4)
    assert history["eval/warping_error_real"][0][1] == pytest.approx(warping_error(real, flow, conf), rel=1e-4)
    terms = [tof_by_hand(fakes[s], seqs[s]["frames"]) for s in seqs]
    assert history["eval/tof"][0][1] == pytest.approx(sum(t for t, _ in terms) / sum(n for _, n in terms), rel=1e-4)

    # The cached real statistics are the bare net's features of the real val clips, and the logged FVD
    # is the Fréchet distance between them and the generated clips' features.
    net = load_feature_net("i3d", weights["i3d"])
    with torch.no_grad():
        real_fvd = net(frames_to_input(to_uint8_frames(real), "fvd")).mean(dim=2).numpy()
        fake_fvd = net(frames_to_input(to_uint8_frames(fake), "fvd")).mean(dim=2).numpy()
    cached = {p.name.split("-")[-3]: p for p in (tmp_path / "eval_stats").glob("*.npz")}
    assert set(cached) == set(names)
    stats = np.load(cached["fvd"])
    np.testing.assert_allclose(stats["mean"], real_fvd.mean(axis=0), rtol=1e-4, atol=1e-5)  # 1 vs 2 threads
    want = frechet_distance(GaussianStats(stats["mean"], stats["cov"], int(stats["count"])),
                            StreamingStats().update(fake_fvd).finalize())
    assert history["random_weights/eval/fvd"][0][1] == pytest.approx(want, rel=1e-3)

    # A second evaluation (computed only, not logged) reads the real statistics from the cache: no real
    # clip goes through the nets.
    again = evaluate_checkpoint(ckpt, shards, ev, step=8, input_sizes=SIZES)
    assert again.real_clips_extracted == 0
    assert again.metrics["random_weights/eval/fvd"] == pytest.approx(history["random_weights/eval/fvd"][0][1])


@pytest.mark.ray
def test_cli_evaluates_a_multimodal_model_with_sampled_styles_and_says_what_is_missing(shards, store, tmp_path,
                                                                                      capsys, caplog):
    """One CLI run: model.use_features, so styles.npz is fitted on the training split (it is missing) and
    every clip is generated with per-object styles drawn from it (seeded per clip); E's reconstruction
    is a metric of its own (_recon); no feature-net weights, so no FID/FVD and the output says which file
    to give; eval.split=train, so the run is tagged as measured on training clips."""
    from vid2vid.cli import main

    assert main(["evaluate", f"shards={shards}"]) == 2
    features = ("model.use_features=true", "model.feat_num=3", "model.nef=8", "model.n_downsample_E=2")
    ckpt, run_id, uri = make_run(tmp_path, store, extra=features)
    with caplog.at_level(logging.WARNING, logger="vid2vid.eval"):
        rc = main(["evaluate", f"checkpoint={ckpt}", f"shards={shards}", "step=3", f"tracking_uri={uri}",
                   "num_clips=0", "clip_len=8", "split=train", "styles=both", "style_seed=4"])
    assert rc == 0 and (ckpt / "styles.npz").is_file(), "fitted on the training clips for the evaluation"
    out = capsys.readouterr().out
    assert "train split" in out and "not computed: eval/fid_i3d" in out
    assert "eval.i3d_weights=/path/to/rgb_imagenet.pt" in out
    assert "eval.resnext_weights=/path/to/resnext-101-kinetics.pth" in caplog.text
    assert "evaluating on TRAINING clips" in caplog.text
    tags = mlflow.tracking.MlflowClient(uri).get_run(run_id).data.tags
    assert "rgb_imagenet.pt" in tags["eval/skipped/fid_i3d"] and "TRAINING clips" in tags["eval/on_training_clips"]
    assert "sampled styles" in tags["eval/styles"]

    cfg, gen = load_generator(ckpt)
    bank = StyleBank.load(ckpt / "styles.npz")
    seqs = sequence_frames(shards, "train")
    sampled, recon = [], []
    for index, seq in enumerate(seqs.values()):  # the plan's order: sequences sorted by name
        draw = StyleSampler(bank, seed=style_seed_of(4, index))
        labels, instances = seq["labels"][0].numpy(), seq["instances"][0].numpy()
        maps = torch.from_numpy(np.stack([draw.features(labels[t], instances[t]) for t in range(len(labels))]))
        sampled.append(generate(gen, cfg, seq, maps[None]))
        with torch.no_grad():
            recon.append(generate(gen, cfg, seq, gen.encode_features(seq["frames"], seq["labels"], seq["instances"])))
    flow, conf = torch.cat([v["flow"] for v in seqs.values()]), torch.cat([v["confidence"] for v in seqs.values()])
    want_sampled = warping_error(torch.cat(sampled), flow, conf)
    want_recon = warping_error(torch.cat(recon), flow, conf)
    assert abs(want_sampled - want_recon) > 1e-4 * want_recon, "the two kinds of generation differ"
    history = run_metrics(uri, run_id)
    assert not [k for k in history if "fid" in k or "fvd" in k]
    assert history["eval/warping_error"] == [(3, pytest.approx(want_sampled, rel=1e-4))]
    assert history["eval/warping_error_recon"] == [(3, pytest.approx(want_recon, rel=1e-4))]
    assert "eval/tof_recon" in history and "eval/tof" in history


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
