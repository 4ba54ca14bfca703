"""vid2vid generate: streaming sequential inference from label folders, videos and shards to mp4,
relabelling, and the typed argument parser. Tiny checkpoints are written directly (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import decord
import numpy as np
import pytest
import torch
from PIL import Image

from vid2vid.cli import main
from vid2vid.config import ConfigError, load_config, parse_command_args, to_dict
from vid2vid.datasets.labels import BadInput, resize_nearest
from vid2vid.generate.inference import GenerateArgs, StreamingGenerator, generate
from vid2vid.generate.inputs import LabelFolder
from vid2vid.generate.relabel import parse_relabel
from vid2vid.media import write_video
from vid2vid.models.generator import Vid2VidGenerator
from vid2vid.models.vid2vid import GeneratorSide, generate_sequence, prepare_inputs

TINY = ["preset=smoke", "model.ngf=8", "model.n_blocks=2", "data.resolution=64x32"]


def make_checkpoint(root: Path, *overrides: str):
    cfg = load_config([*TINY, *overrides])
    ckpt = root / "ckpt"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.manual_seed(0)
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    return ckpt, cfg


def street_labels(t: int, h: int = 48, w: int = 96) -> np.ndarray:
    """Sky over building and vegetation over road, with a car moving right (Cityscapes ids)."""
    a = np.full((h, w), 7, np.uint8)
    a[: h // 3] = 23
    a[h // 3: h // 2, : w // 2] = 11
    a[h // 3: h // 2, w // 2:] = 21
    a[h // 2: h // 2 + 10, 5 + 4 * t: 25 + 4 * t] = 26
    return a


def label_folder(root: Path, n: int, bad_frame: int | None = None) -> Path:
    folder = root / "labels"
    folder.mkdir()
    for t in range(n):
        a = street_labels(t)
        if t == bad_frame:
            a[0, 0] = 40
        Image.fromarray(a).save(folder / f"frame_{t:03d}.png")
    return folder


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convs gain nothing from a second thread; on a shared 2-core machine it only contends."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def spy(monkeypatch):
    """Records what the generator receives for every frame."""
    calls = []
    orig = Vid2VidGenerator.forward

    def forward(self, source, prev_frames, label_ids=None, features=None):
        calls.append(SimpleNamespace(source=source.clone(), prev=prev_frames is not None,
                                     label_ids=None if label_ids is None else label_ids.clone(),
                                     features=None if features is None else features.clone()))
        return orig(self, source, prev_frames, label_ids=label_ids, features=features)

    monkeypatch.setattr(Vid2VidGenerator, "forward", forward)
    return calls


def test_label_folder_to_mp4_side_by_side_and_pngs(tmp_path, spy):
    ckpt, cfg = make_checkpoint(tmp_path)
    labels = label_folder(tmp_path, 7)
    r = generate(GenerateArgs(str(ckpt), str(labels), str(tmp_path / "out.mp4"), side_by_side=True,
                              png_dir=str(tmp_path / "png"), progress=False))
    assert r.frames == 7
    vr = decord.VideoReader(str(r.out))
    assert len(vr) == 7 and vr[0].shape == (32, 64, 3)  # the checkpoint's data.resolution, HxW
    side = decord.VideoReader(str(r.side_by_side))
    assert len(side) == 7 and side[0].shape == (32, 128, 3)
    assert sorted(p.name for p in r.png_dir.iterdir()) == [f"{i:06d}.png" for i in range(7)]
    # 96x48 maps resized nearest to 64x32: the generator sees exactly those ids; first frame has no
    # previous frame (G's own path), every later one does.
    for t, call in enumerate(spy):
        expected = resize_nearest(street_labels(t), (64, 32))
        assert torch.equal(call.label_ids[0], torch.from_numpy(expected).long())
        assert call.prev == (t > 0)
    r = generate(GenerateArgs(str(ckpt), str(labels), str(tmp_path / "short.mp4"), max_frames=4, progress=False))
    assert len(decord.VideoReader(str(r.out))) == 4


def test_streaming_matches_generate_sequence(tmp_path):
    """The ring buffers reproduce generate_sequence on the whole clip exactly, and stay bounded."""
    _, cfg = make_checkpoint(tmp_path)
    torch.manual_seed(0)
    gen = GeneratorSide(cfg.model).eval()
    frames = list(LabelFolder(label_folder(tmp_path, 6), cfg.data.size, cfg.model.label_nc))
    labels = torch.from_numpy(np.stack([f.labels for f in frames]))[None].long()
    edges = torch.from_numpy(np.stack([f.instance_edges for f in frames]))[None].float()
    with torch.no_grad():
        ref = generate_sequence(gen, cfg.model, prepare_inputs(cfg.model, labels, edges)).frames[0]
    streamer = StreamingGenerator(gen, cfg.model)
    out = torch.stack([streamer.step(f) for f in frames])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert len(streamer.sources) == cfg.model.n_frames_G and len(streamer.previous) == cfg.model.prev_frames


def test_relabel_swap_reaches_generator(tmp_path, spy):
    ckpt, _ = make_checkpoint(tmp_path)
    labels = label_folder(tmp_path, 3)
    generate(GenerateArgs(str(ckpt), str(labels), str(tmp_path / "swap.mp4"),
                          relabel="building:vegetation,vegetation:building", progress=False))
    assert len(spy) == 3
    for t, call in enumerate(spy):
        orig = resize_nearest(street_labels(t), (64, 32))
        want = orig.copy()
        want[orig == 11], want[orig == 21] = 21, 11  # simultaneous swap, computed independently
        assert (orig == 11).any() and (orig == 21).any()
        assert torch.equal(call.label_ids[0], torch.from_numpy(want).long())
        # and the one-hot channels of the current frame (last in the window) encode the same map
        assert torch.equal(call.source[0, -1, :35].argmax(0), torch.from_numpy(want).long())


def test_parse_relabel_names_ids_and_errors():
    assert parse_relabel("building:vegetation, vegetation:building", 35) == {11: 21, 21: 11}
    assert parse_relabel("traffic_light:26,7:8", 35) == {19: 26, 7: 8}
    with pytest.raises(ConfigError, match="unknown class 'tree'.*vegetation"):
        parse_relabel("tree:building", 35)
    with pytest.raises(ConfigError, match="id 33, not below the model's label_nc 20"):
        parse_relabel("road:bicycle", 20)
    with pytest.raises(ConfigError, match="mapped twice"):
        parse_relabel("road:sky,7:car", 35)
    with pytest.raises(ConfigError, match="from:to"):
        parse_relabel("road", 35)


def test_bad_label_id_names_the_file(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path)
    labels = label_folder(tmp_path, 4, bad_frame=2)
    with pytest.raises(BadInput, match=r"frame_002\.png.*label id 40 >= label_nc 35"):
        generate(GenerateArgs(str(ckpt), str(labels), str(tmp_path / "x.mp4"), progress=False))
    assert main(["generate", f"checkpoint={ckpt}", f"input={labels}", f"out={tmp_path / 'y.mp4'}",
                 "progress=false"]) == 2
    assert "frame_002.png" in capsys.readouterr().err


def test_arguments_are_typed_and_unknown_keys_named(capsys, tmp_path):
    a = parse_command_args(GenerateArgs, ["checkpoint=c", "input=i", "out=o.mp4", "style_class=7", "max_frames=5",
                                  "side_by_side=true"])
    assert a.style_class == "7" and a.max_frames == 5 and a.side_by_side is True and a.style_seed is None
    with pytest.raises(ConfigError, match="max_frames: expected int"):
        parse_command_args(GenerateArgs, ["checkpoint=c", "input=i", "out=o.mp4", "max_frames=many"])
    with pytest.raises(ConfigError, match="missing required key.*out"):
        parse_command_args(GenerateArgs, ["checkpoint=c", "input=i"])
    ckpt, _ = make_checkpoint(tmp_path)  # checkpoint= is looked up first (vid2vid.platform.locate)
    assert main(["generate", f"checkpoint={ckpt}", "input=i", "out=o.mp4", "bogus=1"]) == 2
    assert "unknown key 'bogus'" in capsys.readouterr().err


def test_video_input_needs_an_edge_model(tmp_path, spy):
    frames = []
    for t in range(9):
        f = np.zeros((60, 80, 3), np.uint8)
        f[20:40, 5 + 5 * t: 25 + 5 * t] = 255
        frames.append(f)
    video = write_video(tmp_path / "in.mp4", frames, fps=10)
    labels_ckpt, _ = make_checkpoint(tmp_path / "a")
    with pytest.raises(BadInput, match="only an edge->video model"):
        generate(GenerateArgs(str(labels_ckpt), str(video), str(tmp_path / "x.mp4"), progress=False))
    ckpt, _ = make_checkpoint(tmp_path / "b", "model.label_nc=0", "model.input_nc=1", "model.fg_bg_prior=false")
    r = generate(GenerateArgs(str(ckpt), str(video), str(tmp_path / "edges.mp4"), progress=False))
    vr = decord.VideoReader(str(r.out))
    assert len(vr) == 9 and vr[0].shape == (32, 64, 3)
    assert spy[0].label_ids is None and spy[0].source.shape == (1, 3, 2, 32, 64)  # edge + instance edge
    edges = spy[4].source[0, -1, 0]
    assert set(edges.unique().tolist()) <= {0.0, 1.0} and edges.sum() > 0  # Canny of the moving square


def write_shards(out: Path, frames: int = 8, clip_len: int = 4, stride: int = 2, size=(64, 32)) -> np.ndarray:
    """One synthetic sequence as overlapping clips through the shards API (no Ray); returns its labels."""
    from vid2vid.datasets import shards
    from vid2vid.datasets.labels import instance_edges
    from vid2vid.datasets.synthetic import make_sequence

    seq = make_sequence(frames, *size, seed=3)
    starts = list(range(0, frames - clip_len + 1, stride))

    def cut(a):
        return np.stack([a[s:s + clip_len] for s in starts])

    cols = {"labels": cut(seq.labels), "instances": cut(seq.instances),
            "instance_edges": cut(instance_edges(seq.instances)), "frames": cut(seq.frames),
            "flow": cut(seq.flow), "confidence": cut(seq.valid.astype(np.uint8))}
    shards.write_shard(shards.clips_table(cols, "seq0", starts, list(range(len(starts)))),
                       out / "train" / "seq0.parquet", {})
    shards.write_manifest(out, {"schema_version": shards.SCHEMA_VERSION, "label_nc": 35, "input_nc": 0,
                                "resolution": list(size), "clip_len": clip_len,
                                "splits": {"train": {"clips": len(starts), "sequences": 1, "has_frames": True}},
                                "shards": [{"path": "train/seq0.parquet", "split": "train", "sequence": "seq0",
                                            "clips": len(starts), "first_clip": 0}]})
    return seq.labels


def test_shards_input_streams_the_sequence_in_order(tmp_path, spy):
    ckpt, _ = make_checkpoint(tmp_path)
    labels = write_shards(tmp_path / "shards")  # clips start at 0, 2, 4: frames overlap
    out = tmp_path / "shards.mp4"
    assert main(["generate", f"checkpoint={ckpt}", f"input={tmp_path / 'shards'}", f"out={out}",
                 "progress=false"]) == 0
    assert len(decord.VideoReader(str(out))) == 8
    assert len(spy) == 8
    for t, call in enumerate(spy):
        assert torch.equal(call.label_ids[0], torch.from_numpy(labels[t]).long())


def test_dense_multichannel_shards_reach_the_generator_in_unit_range(tmp_path, spy):
    """Face/pose shards store (T,H,W,C) uint8 codes; the model takes (C,H,W) in [0, 1]."""
    from vid2vid.datasets import shards

    rng = np.random.default_rng(0)
    codes = rng.integers(0, 256, (1, 3, 32, 64, 3), dtype=np.uint8)
    zeros = np.zeros((1, 3, 32, 64), np.uint8)
    table = shards.clips_table({"labels": codes, "instances": zeros, "instance_edges": zeros}, "s", [0], [0])
    shards.write_shard(table, tmp_path / "d" / "test" / "s.parquet", {})
    shards.write_manifest(tmp_path / "d", {"schema_version": shards.SCHEMA_VERSION, "label_nc": 0, "input_nc": 3,
                                           "resolution": [64, 32], "clip_len": 3,
                                           "splits": {"test": {"clips": 1, "has_frames": False}},
                                           "shards": [{"path": "test/s.parquet", "split": "test"}]})
    ckpt, _ = make_checkpoint(tmp_path, "model.label_nc=0", "model.input_nc=3", "model.fg_bg_prior=false")
    r = generate(GenerateArgs(str(ckpt), str(tmp_path / "d"), str(tmp_path / "dense.mp4"), progress=False))
    assert r.frames == 3
    for t, call in enumerate(spy):
        want = torch.from_numpy(codes[0, t]).permute(2, 0, 1).float() / 255
        torch.testing.assert_close(call.source[0, -1, :3], want)


def test_real_cityscapes_labels_with_instance_maps(tmp_path, sample_data, spy):
    seq = sample_data / "cityscapes_sample" / "test_A" / "stuttgart_00"
    reader = LabelFolder(seq, (64, 32), 35)
    assert len(reader.instances) == len(reader.labels) == 30  # test_inst/stuttgart_00 found beside it
    ckpt, _ = make_checkpoint(tmp_path)
    r = generate(GenerateArgs(str(ckpt), str(seq), str(tmp_path / "real.mp4"), max_frames=3, progress=False))
    assert r.frames == 3 and len(decord.VideoReader(str(r.out))) == 3
    first = np.asarray(Image.open(reader.labels[0]))
    assert torch.equal(spy[0].label_ids[0], torch.from_numpy(resize_nearest(first, (64, 32))).long())
