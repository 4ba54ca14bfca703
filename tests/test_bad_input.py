"""Bad input: each case is rejected with its file (and frame) and reason; valid input is still prepared; and
through the command line each bad input ends in one line on stderr and exit status 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vid2vid.config import DataConfig
from vid2vid.datasets.labels import BadInput
from vid2vid.datasets.prepare import PrepareError, plan, prepare
from vid2vid.datasets.readers import Vid2VidFolders, VideoFiles
from vid2vid.datasets.synthetic import make_sequence

W, H = 64, 32


def write_seq(root: Path, name: str, n: int = 4, seed: int = 0, split: str = "train") -> list[Path]:
    """A small vid2vid-layout sequence (PNG labels and instances, JPEG frames); returns its stems."""
    seq = make_sequence(n, W, H, seed)
    stems = []
    for t in range(n):
        stem = f"{name}_{t:06d}"
        for sub, arr, ext in (("A", seq.labels[t], "png"), ("B", seq.frames[t], "jpg"),
                              ("inst", seq.instances[t], "png")):
            d = root / f"{split}_{sub}" / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"{stem}.{ext}", quality=95)
        stems.append(root / "train_A" / name / f"{stem}.png")
    return stems


def cfg_for(root: Path, **kw) -> DataConfig:
    return DataConfig(source=str(root), resolution=f"{W}x{H}", clip_len=3, **kw)


def read_all(cfg: DataConfig):
    """List, then read every listed sequence; returns (listing rejects, read errors, good names)."""
    src = Vid2VidFolders(cfg)
    listing = src.list()
    errors, good = [], []
    for spec in listing.sequences:
        try:
            src.read(spec, 0, spec.num_frames)
            good.append(spec.name)
        except BadInput as err:
            errors.append(err)
    return listing.rejects, errors, good


def frame_path(root: Path, name: str, t: int, sub: str = "B") -> Path:
    return root / f"train_{sub}" / name / f"{name}_{t:06d}.{'jpg' if sub == 'B' else 'png'}"


# ------------------------------------------------------------------------------------------------
# one case at a time, at the source level (no Ray)


def test_corrupt_png_label(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    p = frame_path(tmp_path, "bad", 2, "A")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])  # truncated: header fine, data cut
    _, errors, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert errors[0].path == str(p) and errors[0].frame == 2 and "cannot decode image" in errors[0].reason


def test_corrupt_jpeg_frame(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    p = frame_path(tmp_path, "bad", 1)
    p.write_bytes(os.urandom(600))
    _, errors, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert errors[0].path == str(p) and errors[0].frame == 1 and "cannot decode image" in errors[0].reason


def test_label_frame_count_mismatch(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    frame_path(tmp_path, "bad", 3).unlink()
    rejects, _, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert rejects[0].path == str(tmp_path / "train_B" / "bad")
    assert "count mismatch: 4 label maps" in rejects[0].reason and "but 3 frames" in rejects[0].reason


def test_label_id_out_of_range(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    p = frame_path(tmp_path, "bad", 2, "A")
    lab = np.asarray(Image.open(p)).copy()
    lab[5, 5] = 40
    Image.fromarray(lab).save(p)
    _, errors, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert errors[0].path == str(p) and errors[0].frame == 2
    assert "label id 40 >= label_nc 35" in errors[0].reason
    _, errors, good = read_all(cfg_for(tmp_path, label_nc=41))  # a larger label count accepts it
    assert errors == [] and sorted(good) == ["bad", "good"]


def test_sequence_shorter_than_a_clip(tmp_path):
    write_seq(tmp_path, "good", n=4)
    write_seq(tmp_path, "short", n=2, seed=1)
    cfg = cfg_for(tmp_path)
    tasks, rejects = plan(Vid2VidFolders(cfg).list().sequences, cfg)
    assert {t.spec.name for t in tasks} == {"good"}
    assert rejects[0].path == str(tmp_path / "train_A" / "short")
    assert rejects[0].reason == "sequence shorter than a clip: 2 frames < clip_len 3"


def test_frame_size_changes_inside_a_sequence(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    p = frame_path(tmp_path, "bad", 3)
    Image.open(p).resize((80, 40)).save(p)
    _, errors, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert errors[0].path == str(p) and errors[0].frame == 3
    assert "frame size changed inside the sequence: 80x40" in errors[0].reason


def test_empty_folder(tmp_path):
    write_seq(tmp_path, "good")
    (tmp_path / "train_A" / "empty").mkdir()
    rejects, _, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert rejects[0].path == str(tmp_path / "train_A" / "empty")
    assert rejects[0].reason.startswith("empty folder")


def test_unreadable_paths(tmp_path):
    write_seq(tmp_path, "good")
    write_seq(tmp_path, "bad", seed=1)
    (tmp_path / "train_A" / "dangling").symlink_to(tmp_path / "missing_dir")
    p = frame_path(tmp_path, "bad", 0)
    p.unlink()
    p.symlink_to(tmp_path / "missing.jpg")
    rejects, errors, good = read_all(cfg_for(tmp_path))
    assert good == ["good"]
    assert rejects[0].path == str(tmp_path / "train_A" / "dangling") and "unreadable path" in rejects[0].reason
    assert errors[0].path == str(p) and errors[0].frame == 0
    assert errors[0].reason == "unreadable path: FileNotFoundError: No such file or directory"


def test_truncated_and_corrupt_video(tmp_path, sample_data):
    data = (sample_data / "videos" / "box.mp4").read_bytes()
    (tmp_path / "truncated.mp4").write_bytes(data[: int(len(data) * 0.3)])
    (tmp_path / "garbage.avi").write_bytes(os.urandom(4000))
    shutil.copy(sample_data / "videos" / "tree.avi", tmp_path / "tree.avi")
    src = VideoFiles(DataConfig(source=str(tmp_path), resolution="64x48", clip_len=4))
    listing = src.list()
    assert [r.path for r in listing.rejects] == [str(tmp_path / "garbage.avi")]
    assert listing.rejects[0].reason.startswith("cannot open video")
    specs = {s.name: s for s in listing.sequences}
    src.read(specs["tree"], 0, 68)  # the whole valid video decodes
    with pytest.raises(BadInput, match="truncated or corrupt video") as info:
        src.read(specs["truncated"], 0, specs["truncated"].num_frames)
    assert info.value.path == str(tmp_path / "truncated.mp4") and info.value.frame is not None


# ------------------------------------------------------------------------------------------------
# through the Ray pipeline: every case at once lands in the manifest; the good sequences are prepared


def test_prepare_rejects_each_bad_input_and_keeps_the_rest(tmp_path, ray_cluster):
    root = tmp_path / "data"
    write_seq(root, "good1", n=6, seed=0)
    write_seq(root, "good2", n=4, seed=5)
    write_seq(root, "corrupt", seed=1)
    frame_path(root, "corrupt", 1).write_bytes(b"\xff\xd8 not a jpeg")
    write_seq(root, "mismatch", seed=2)
    frame_path(root, "mismatch", 0).unlink()
    write_seq(root, "badlabel", seed=3)
    p = frame_path(root, "badlabel", 2, "A")
    Image.fromarray(np.full((H, W), 200, np.uint8)).save(p)
    write_seq(root, "short", n=2, seed=4)
    write_seq(root, "resized", seed=6)
    Image.open(frame_path(root, "resized", 2)).resize((32, 16)).save(frame_path(root, "resized", 2))
    (root / "train_A" / "empty").mkdir()
    (root / "train_A" / "dangling").symlink_to(root / "nowhere")

    out = tmp_path / "out"
    summary = prepare(cfg_for(root, out=str(out)), progress=False)
    assert summary.clips == {"train": 3}  # good1: starts 0, 3; good2: start 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["train"]["clips"] == 3 and manifest["splits"]["train"]["sequences"] == 2
    reasons = {Path(r["path"]).parent.name if r["path"].endswith((".png", ".jpg")) else Path(r["path"]).name:
               r["reason"] for r in manifest["rejected"]}
    assert reasons["corrupt"].startswith("cannot decode image")
    assert "count mismatch" in reasons["mismatch"]
    assert "label id 200 >= label_nc 35" in reasons["badlabel"]
    assert "shorter than a clip" in reasons["short"]
    assert "size changed" in reasons["resized"]
    assert reasons["empty"].startswith("empty folder")
    assert "unreadable path" in reasons["dangling"]
    assert len(manifest["rejected"]) == 7
    frames = {r["path"]: r.get("frame") for r in manifest["rejected"]}
    assert frames[str(p)] == 2
    text = summary.format()
    assert "rejected 7 inputs" in text and "label id 200" in text


def test_everything_rejected_is_a_clear_error(tmp_path):
    write_seq(tmp_path, "short", n=2)
    (tmp_path / "train_A" / "empty").mkdir()
    with pytest.raises(PrepareError, match="every input was rejected") as info:
        prepare(cfg_for(tmp_path, out=str(tmp_path / "out")), progress=False)
    assert "short: sequence shorter than a clip" in str(info.value)
    assert "empty: empty folder" in str(info.value)
    with pytest.raises(PrepareError, match="does not exist"):
        prepare(cfg_for(tmp_path / "no_such_dir", out=str(tmp_path / "out")), progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------
# through the command line: every bad input ends in one line on stderr and exit status 2

REPO = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "PYTHONPATH": str(REPO),
       "DS_ACCELERATOR": "cpu", "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}


def tiny_checkpoint(root: Path, *overrides: str) -> Path:
    """A checkpoint folder as training writes it (config.json + generator/weights.pt), written directly."""
    import torch

    from vid2vid.config import load_config, to_dict
    from vid2vid.models.vid2vid import GeneratorSide

    cfg = load_config(["preset=smoke", "model.ngf=8", "model.n_blocks=2", f"data.resolution={W}x{H}", *overrides])
    ckpt = root / "ckpt"
    (ckpt / "generator").mkdir(parents=True)
    (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
    torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
    return ckpt


def case_missing_source(tmp: Path):
    return ["prepare", f"source={tmp / 'nope'}", f"out={tmp / 'out'}"], ["prepare: data.source=", "nope does not exist"]


def case_text_files(tmp: Path):
    (tmp / "notes").mkdir()
    for name in ("a.txt", "b.txt"):
        (tmp / "notes" / name).write_text("not a frame\n")
    return ["prepare", f"source={tmp / 'notes'}", f"out={tmp / 'out'}"], ["cannot tell the layout", "notes"]


def case_corrupt_png(tmp: Path):
    labels = write_seq(tmp / "data", "seq", n=3)
    labels[1].write_bytes(labels[1].read_bytes()[:60])
    return (["generate", f"checkpoint={tiny_checkpoint(tmp)}", f"input={labels[0].parent}", f"out={tmp / 'x.mp4'}"],
            [f"{labels[1]} (frame 1): cannot decode image"])


def case_truncated_video(tmp: Path):
    from vid2vid.media import write_video

    rng = np.random.default_rng(0)
    video = write_video(tmp / "clip.mp4", (rng.integers(0, 255, (H, W, 3), np.uint8) for _ in range(40)))
    video.write_bytes(video.read_bytes()[: video.stat().st_size // 3])
    ckpt = tiny_checkpoint(tmp, "model.label_nc=0", "model.input_nc=1", "model.use_instance=false",
                           "model.fg_bg_prior=false")
    return ["generate", f"checkpoint={ckpt}", f"input={video}", f"out={tmp / 'x.mp4'}"], [str(video), "video"]


def case_raft_without_weights(tmp: Path):
    write_seq(tmp / "data", "seq", n=3)
    return (["prepare", f"source={tmp / 'data'}", f"out={tmp / 'out'}", "flow=raft"],
            ["data.raft_weights is required with data.flow=raft", "raft-small.pth"])


def case_wrong_format_weights(tmp: Path):
    """Found inside a Ray Data actor (the flow estimator loads the weights there): Ray's error is unwrapped."""
    import torch

    write_seq(tmp / "data", "seq", n=3)
    torch.save({"encoder.conv.weight": torch.zeros(3)}, tmp / "raft-small.pth")
    return (["prepare", f"source={tmp / 'data'}", f"out={tmp / 'out'}", "flow=raft",
             f"raft_weights={tmp / 'raft-small.pth'}", "clip_len=3"],
            [f"{tmp / 'raft-small.pth'}: unexpected key 'encoder.conv.weight'"])


def case_corrupt_weights(tmp: Path):
    ckpt = tiny_checkpoint(tmp)
    weights = ckpt / "generator" / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:5000])
    labels = write_seq(tmp / "data", "seq", n=3)
    return (["generate", f"checkpoint={ckpt}", f"input={labels[0].parent}", f"out={tmp / 'x.mp4'}"],
            [f"{weights}: cannot read the weights"])


def case_missing_checkpoint(tmp: Path):
    return (["generate", f"checkpoint={tmp / 'runs' / 'nope'}", f"input={tmp}", f"out={tmp / 'x.mp4'}"],
            [f"checkpoint={tmp / 'runs' / 'nope'}: no such file or folder"])


def case_corrupt_checkpoint_config(tmp: Path):
    ckpt = tiny_checkpoint(tmp)
    (ckpt / "config.json").write_text("{not json")
    return (["generate", f"checkpoint={ckpt}", f"input={tmp}", f"out={tmp / 'x.mp4'}"],
            [f"{ckpt / 'config.json'}: cannot read the checkpoint's config"])


def case_run_folder_without_checkpoint(tmp: Path):
    run = tmp / "runs" / "ray" / "smoke-1"  # a run that died before its first checkpoint
    run.mkdir(parents=True)
    (run / "mlflow_run_id.txt").write_text("0" * 32)
    return (["generate", f"checkpoint={run}", f"input={tmp}", f"out={tmp / 'x.mp4'}"],
            [f"run folder {run} holds no complete checkpoint yet"])


def case_blank_answers(tmp: Path):
    from vid2vid.media import write_video

    for run in ("A", "B"):
        (tmp / run).mkdir()
        write_video(tmp / run / "seq.mp4", [np.full((H, W, 3), 40 if run == "A" else 200, np.uint8)] * 2)
    pairs = subprocess.run([sys.executable, "-m", "vid2vid.cli", "ab-pairs", f"run_a={tmp / 'A'}",
                            f"run_b={tmp / 'B'}", f"out={tmp / 'ab'}"], env=ENV, capture_output=True, text=True)
    assert pairs.returncode == 0, pairs.stderr
    return (["ab-score", f"answers={tmp / 'ab' / 'answers.csv'}", f"key={tmp / 'ab' / 'key.json'}"],
            [f"{tmp / 'ab' / 'answers.csv'}: no left or right answer in 1 rows"])


def case_experiment_without_source(tmp: Path):
    """A preset for real data, run as the README's first example would be without data.source."""
    return (["experiments/cityscapes.py", f"train.run_dir={tmp / 'runs'}"],
            ["experiments/cityscapes.py: data.source is required", "github.com/NVIDIA/vid2vid",
             "www.cityscapes-dataset.com"])


BAD_INPUTS = [case_missing_source, case_text_files, case_corrupt_png, case_truncated_video, case_raft_without_weights,
              case_wrong_format_weights, case_corrupt_weights, case_missing_checkpoint,
              case_corrupt_checkpoint_config, case_run_folder_without_checkpoint, case_blank_answers,
              case_experiment_without_source]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=lambda c: c.__name__.removeprefix("case_"))
def test_bad_input_is_one_line_and_exit_status_2(case, tmp_path):
    args, expected = case(tmp_path)
    command = [sys.executable, *args] if args[0].endswith(".py") else [sys.executable, "-m", "vid2vid.cli", *args]
    out = subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2, f"exit status {out.returncode}\n{out.stderr[-3000:]}"
    assert 1 <= len(lines) <= 3 and "Traceback" not in out.stderr, out.stderr[-3000:]
    prog = "experiments/cityscapes.py" if args[0].endswith(".py") else f"vid2vid {args[0]}"
    assert lines[-1].startswith(f"{prog}: "), lines
    for text in expected:
        assert text in lines[-1], f"{text!r} not in {lines[-1]!r}"


def test_loading_a_folder_that_is_no_checkpoint_names_it(tmp_path):
    """``load_generator`` (the Python API of a notebook or script) on a folder without config.json."""
    from vid2vid.checkpoints import load_generator
    from vid2vid.errors import CheckpointError

    with pytest.raises(CheckpointError) as info:
        load_generator(tmp_path)
    assert str(info.value) == f"{tmp_path}: no config.json; is it a vid2vid training checkpoint?"
