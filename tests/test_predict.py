"""Future prediction (paper §4): the baseline label-map predictor trains on prepared shards, rolls out,
and `vid2vid predict` renders observed + predicted label maps with a vid2vid checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import decord
import pytest
import torch

from vid2vid.cli import main
from vid2vid.config import load_config, to_dict
from vid2vid.datasets.shards import iter_clips
from vid2vid.generate.predict import (
    LabelPredictor,
    PredictArgs,
    PredictorConfig,
    PredictTrainArgs,
    clip_windows,
    load_predictor,
    predict,
    rollout,
    train_predictor,
)
from vid2vid.models.generator import Vid2VidGenerator
from vid2vid.models.vid2vid import GeneratorSide

pytestmark = pytest.mark.ray  # the shards come from the real prepare pipeline

SMALL = ["preset=smoke", "data.resolution=64x32"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, ray_cluster):
    """Tiny synthetic shards made by the real prepare pipeline (Ray Data)."""
    from vid2vid.datasets.prepare import prepare

    out = tmp_path_factory.mktemp("predict") / "shards"
    cfg = load_config([*SMALL, "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
                       f"data.out={out}"])
    prepare(cfg.data, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(shards, tmp_path_factory):
    path = tmp_path_factory.mktemp("predictor") / "predictor.pt"
    return train_predictor(PredictTrainArgs(str(shards), str(path), context=2, steps=25, windows=2, width=8))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = load_config([*SMALL, "model.ngf=8", "model.n_blocks=2"])
    ckpt = tmp_path_factory.mktemp("vid2vid") / "ckpt"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    return ckpt


def test_predictor_trains_on_shards(trained):
    assert trained.steps == 25 and trained.path.is_file()
    assert all(math.isfinite(x) for x in trained.losses)
    first, last = trained.losses[0], sum(trained.losses[-5:]) / 5
    assert last < first, (first, last)
    model = load_predictor(trained.path)
    assert model.cfg == PredictorConfig(label_nc=35, context=2, width=8, resolution="64x32")


def test_clip_windows_pair_each_frame_with_its_past():
    labels = torch.arange(5).view(5, 1, 1).expand(5, 2, 3)
    past, nxt = clip_windows(labels, 2)
    assert past.shape == (3, 2, 2, 3) and nxt.shape == (3, 2, 3)
    assert past[:, :, 0, 0].tolist() == [[0, 1], [1, 2], [2, 3]] and nxt[:, 0, 0].tolist() == [2, 3, 4]


def test_persistence_term_alone_repeats_the_last_map(shards):
    """With the conv output zeroed, the logits are persistence * one_hot(last): the argmax is the
    last observed map, so the rollout repeats it (the baseline's starting point)."""
    model = LabelPredictor(PredictorConfig(label_nc=35, context=2, width=8)).eval()
    torch.nn.init.zeros_(model.out.weight)
    torch.nn.init.zeros_(model.out.bias)
    clip = next(iter_clips(shards))
    context = [clip.labels[0, t].to(torch.uint8).numpy() for t in (0, 1)]
    out = list(rollout(model, context, 3))
    assert len(out) == 3
    for m in out:
        assert (m == context[1]).all()
    with pytest.raises(ValueError, match="takes 2 context maps, got 1"):
        list(rollout(model, context[:1], 1))


def test_predict_renders_observed_and_predicted_frames(shards, trained, checkpoint, tmp_path, monkeypatch):
    seen = []
    orig = Vid2VidGenerator.forward

    def forward(self, source, prev_frames, label_ids=None, features=None):
        seen.append(label_ids[0].clone())
        return orig(self, source, prev_frames, label_ids=label_ids, features=features)

    monkeypatch.setattr(Vid2VidGenerator, "forward", forward)
    out = tmp_path / "future.mp4"
    assert main(["predict", f"checkpoint={checkpoint}", f"predictor={trained.path}", f"input={shards}",
                 "context=2", "future=5", f"out={out}", "progress=false"]) == 0
    vr = decord.VideoReader(str(out))
    assert len(vr) == 2 + 5 and vr[0].shape == (32, 64, 3)
    # the generator rendered the observed maps, then exactly the predictor's rollout
    clip = next(iter_clips(shards))
    context = [clip.labels[0, t].to(torch.uint8).numpy() for t in (0, 1)]
    expected = context + list(rollout(load_predictor(trained.path), context, 5))
    assert len(seen) == 7
    for got, want in zip(seen, expected, strict=True):
        assert torch.equal(got, torch.from_numpy(want).long())
    r = predict(PredictArgs(str(checkpoint), str(trained.path), str(shards), str(tmp_path / "only.mp4"),
                            future=4, include_context=False, progress=False))
    assert (r.observed, r.predicted) == (0, 4) and len(decord.VideoReader(str(r.out))) == 4


def test_predict_checks_context_and_classes(shards, trained, checkpoint, tmp_path):
    with pytest.raises(ValueError, match="trained with context 2"):
        predict(PredictArgs(str(checkpoint), str(trained.path), str(shards), str(tmp_path / "x.mp4"), context=3,
                            progress=False))
    with pytest.raises(ValueError, match="fewer than start=7 \\+ context 2"):
        predict(PredictArgs(str(checkpoint), str(trained.path), str(shards), str(tmp_path / "x.mp4"), start=7,
                            progress=False))
