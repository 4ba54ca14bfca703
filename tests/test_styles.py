"""Multimodal styles: per-class Gaussian mixtures over encoder E's object features, and sampling one
fixed vector per object. Tiny checkpoints and shards are written directly (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import decord
import numpy as np
import pytest
import torch

from vid2vid.cli import main
from vid2vid.config import load_config, to_dict
from vid2vid.datasets.shards import iter_clips
from vid2vid.generate.inference import GenerateArgs, StreamingGenerator, generate
from vid2vid.generate.inputs import ShardFrames
from vid2vid.generate.styles import StyleBank, StyleSampler, fit_styles
from vid2vid.models.vid2vid import GeneratorSide

TINY = ["preset=smoke", "model.ngf=8", "model.n_blocks=2", "data.resolution=64x32"]
FEATURES = ["model.use_features=true", "model.feat_num=3", "model.nef=8", "model.n_downsample_E=2"]
ROAD, CAR = 7, 26


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_checkpoint(root: Path, *overrides: str) -> Path:
    cfg = load_config([*TINY, *overrides])
    ckpt = root / "ckpt"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    return ckpt


def write_shards(out: Path, sequences: int = 2, frames: int = 8, clip_len: int = 4, size=(64, 32)) -> Path:
    """Synthetic street sequences as Parquet clips through the shards API (no Ray)."""
    from vid2vid.datasets import shards
    from vid2vid.datasets.labels import instance_edges
    from vid2vid.datasets.synthetic import make_sequence

    entries = []
    for i in range(sequences):
        seq = make_sequence(frames, *size, seed=10 + i)
        starts = list(range(0, frames - clip_len + 1, clip_len))

        def cut(a, starts=starts):
            return np.stack([a[s:s + clip_len] for s in starts])

        cols = {"labels": cut(seq.labels), "instances": cut(seq.instances),
                "instance_edges": cut(instance_edges(seq.instances)), "frames": cut(seq.frames),
                "flow": cut(seq.flow), "confidence": cut(seq.valid.astype(np.uint8))}
        path = f"train/seq{i}.parquet"
        shards.write_shard(shards.clips_table(cols, f"seq{i}", starts, list(range(len(starts)))), out / path, {})
        entries.append({"path": path, "split": "train", "sequence": f"seq{i}", "clips": len(starts),
                        "first_clip": 0})
    shards.write_manifest(out, {"schema_version": shards.SCHEMA_VERSION, "label_nc": 35, "input_nc": 0,
                                "resolution": list(size), "clip_len": clip_len,
                                "splits": {"train": {"clips": sum(e["clips"] for e in entries),
                                                     "sequences": sequences, "has_frames": True}},
                                "shards": entries})
    return out


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    root = tmp_path_factory.mktemp("styles")
    ckpt = make_checkpoint(root, *FEATURES)
    shards = write_shards(root / "shards")
    return ckpt, shards, fit_styles(ckpt, shards, components=2)


def test_fit_styles_mixtures_match_encoder_features(fitted):
    ckpt, shards, result = fitted
    bank = StyleBank.load(ckpt / "styles.npz")  # saved beside the checkpoint, loads without pickle
    np.testing.assert_array_equal(bank.means, result.bank.means)
    clips = list(iter_clips(shards))
    all_labels = np.concatenate([c.labels.numpy().ravel() for c in clips])
    assert bank.classes.tolist() == sorted(np.unique(all_labels).tolist())
    np.testing.assert_allclose(bank.weights.sum(1), 1.0, atol=1e-6)
    # Independent computation for the car class: E's raw map averaged over each car's pixels by hand.
    gen = GeneratorSide(load_config([*TINY, *FEATURES]).model)
    gen.load_state_dict(torch.load(ckpt / "generator" / "weights.pt", weights_only=True))
    vectors = []
    with torch.no_grad():
        for c in clips:
            raw = gen.encoder.net(c.frames[0])  # (T, 3, H, W) before pooling
            for t in range(raw.shape[0]):
                cars = c.labels[0, t] == CAR
                for inst in c.instances[0, t][cars].unique():
                    m = cars & (c.instances[0, t] == inst)
                    vectors.append(raw[t][:, m].mean(1).numpy())
    row = bank.row(CAR)
    assert bank.counts[row] == len(vectors) > 2  # one vector per car per frame
    # EM keeps the mixture's overall mean equal to the data mean.
    mixture_mean = (bank.weights[row, :, None] * bank.means[row]).sum(0)
    np.testing.assert_allclose(mixture_mean, np.mean(vectors, 0), atol=1e-4)


def frames_with_two_cars():
    labels = np.full((2, 32, 64), ROAD, np.uint8)
    labels[:, :8] = 23  # sky
    inst = np.zeros((2, 32, 64), np.int64)
    for t, x in enumerate((4, 12)):  # car 3 moves between frames; car 5 stays
        labels[t, 12:20, x:x + 10], inst[t, 12:20, x:x + 10] = CAR, 3
        labels[t, 22:28, 40:50], inst[t, 22:28, 40:50] = CAR, 5
    return labels, inst


def test_object_vector_is_fixed_over_time_and_per_instance(fitted):
    bank = fitted[2].bank
    labels, inst = frames_with_two_cars()
    s = StyleSampler(bank, seed=7)
    f0, f1 = (s.features(labels[t], inst[t]) for t in range(2))
    assert f0.shape == (3, 32, 64)
    car3_t0, car3_t1 = f0[:, 12, 4], f1[:, 12, 12]
    np.testing.assert_array_equal(car3_t0, car3_t1)  # same object, same vector, new position
    assert not np.allclose(car3_t0, f0[:, 22, 40])  # another car draws its own vector
    # A fresh sampler with the same seed draws the same vectors (no state carried between videos).
    np.testing.assert_array_equal(StyleSampler(bank, seed=7).features(labels[1], inst[1]), f1)
    assert not np.allclose(StyleSampler(bank, seed=8).features(labels[1], inst[1]), f1)
    # No seed: every object of a class takes the class's heaviest component mean.
    mode = StyleSampler(bank).features(labels[0], inst[0])
    row = bank.row(CAR)
    np.testing.assert_allclose(mode[:, 12, 4], bank.means[row, bank.weights[row].argmax()], atol=1e-6)


def test_style_class_resamples_only_that_class(fitted):
    bank = fitted[2].bank
    labels, inst = frames_with_two_cars()
    road = labels[0] == ROAD
    a = StyleSampler(bank, seed=1, style_class=ROAD).features(labels[0], inst[0])
    b = StyleSampler(bank, seed=2, style_class=ROAD).features(labels[0], inst[0])
    base = StyleSampler(bank).features(labels[0], inst[0])
    np.testing.assert_array_equal(a[:, ~road], b[:, ~road])  # every other class unchanged...
    np.testing.assert_array_equal(a[:, ~road], base[:, ~road])  # ...and equal to the default render
    assert not np.allclose(a[:, road], b[:, road])
    seeded = StyleSampler(bank, seed=5).features(labels[0], inst[0])
    c = StyleSampler(bank, seed=1, style_class=ROAD, base_seed=5).features(labels[0], inst[0])
    np.testing.assert_array_equal(c[:, ~road], seeded[:, ~road])
    np.testing.assert_array_equal(c[:, road], a[:, road])
    with pytest.raises(ValueError, match="style_class needs style_seed"):
        StyleSampler(bank, style_class=ROAD)


def test_generate_with_style_seed_is_reproducible(fitted, tmp_path):
    ckpt, shards, _ = fitted
    common = [f"checkpoint={ckpt}", f"input={shards}", "max_frames=4", "progress=false"]
    videos = {}
    for name, extra in (("a", ["style_seed=3"]), ("b", ["style_seed=3"]), ("c", ["style_seed=4"]),
                        ("road", ["style_seed=4", "style_class=road"])):
        out = tmp_path / f"{name}.mp4"
        assert main(["generate", *common, f"out={out}", *extra]) == 0
        videos[name] = decord.VideoReader(str(out)).get_batch(list(range(4))).asnumpy()
        assert videos[name].shape == (4, 32, 64, 3)
    np.testing.assert_array_equal(videos["a"], videos["b"])
    assert np.abs(videos["a"].astype(int) - videos["c"].astype(int)).mean() > 0.5


def test_generator_receives_the_sampled_features(fitted):
    ckpt, shards, result = fitted
    from vid2vid.checkpoints import load_generator

    cfg, gen = load_generator(ckpt)
    seen = []
    orig = gen.forward

    def forward(source, prev, label_ids, features=None):
        seen.append(features[0, -1].clone())
        return orig(source, prev, label_ids, features)

    gen.forward = forward
    s = StyleSampler(result.bank, seed=11)
    streamer = StreamingGenerator(gen, cfg.model)
    for k, frame in enumerate(ShardFrames(shards, (64, 32), 35, "train")):
        expected = s.features(frame.labels, frame.instances)
        streamer.step(frame, expected)
        np.testing.assert_array_equal(seen[k].numpy(), expected)
        if k == 2:
            break


def test_style_errors_name_the_fix(fitted, tmp_path, capsys):
    _, shards, _ = fitted
    plain = make_checkpoint(tmp_path / "plain")
    with pytest.raises(ValueError, match="trained without model.use_features"):
        generate(GenerateArgs(str(plain), str(shards), str(tmp_path / "x.mp4"), style_seed=1, progress=False))
    with pytest.raises(ValueError, match="no encoder E"):
        fit_styles(plain, shards)
    unfitted = make_checkpoint(tmp_path / "unfitted", *FEATURES)
    assert main(["generate", f"checkpoint={unfitted}", f"input={shards}", f"out={tmp_path / 'y.mp4'}",
                 "progress=false"]) == 2
    assert "vid2vid fit-styles" in capsys.readouterr().err
