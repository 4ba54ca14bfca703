"""The validation split evaluation reads: the source's own, another folder, or sequences held out of
training by name or fraction, recorded in the manifest; prepared end to end on a folder layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from vid2vid.config import ConfigError, DataConfig, load_config
from vid2vid.datasets.prepare import PrepareError, prepare, with_val_split
from vid2vid.datasets.registry import make_source
from vid2vid.datasets.sources import Listing, SequenceSpec
from vid2vid.datasets.synthetic import make_sequence

W, H = 64, 32


def write_seq(root: Path, split: str, name: str, n: int = 4, seed: int = 0) -> None:
    """A small vid2vid-layout sequence: <split>_A labels, <split>_B frames."""
    seq = make_sequence(n, W, H, seed)
    for t in range(n):
        for sub, arr, ext in (("A", seq.labels[t], "png"), ("B", seq.frames[t], "jpg")):
            d = root / f"{split}_{sub}" / name
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(d / f"{name}_{t:06d}.{ext}", quality=95)


def training(names: list[str]) -> Listing:
    return Listing([SequenceSpec("train", n, 10) for n in names], [])


def splits(listing: Listing) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for s in listing.sequences:
        out.setdefault(s.split, []).append(s.name)
    return out


def test_held_out_by_fraction_spread_over_the_sorted_names():
    names = [f"seq{i}" for i in range(8)]
    listing, origin = with_val_split(DataConfig(source="x", val_fraction=0.25), "vid2vid", training(names[::-1]))
    assert sorted(splits(listing)["val"]) == ["seq0", "seq7"]  # 2 of 8, first and last of the spread
    assert len(splits(listing)["train"]) == 6
    assert origin == "held out of train: data.val_fraction=0.25, 2 of 8 sequences ['seq0', 'seq7']"
    listing, _ = with_val_split(DataConfig(source="x", val_fraction=0.1), "vid2vid", training(names[:3]))
    assert splits(listing)["val"] == ["seq0"]  # at least one
    alone, origin = with_val_split(DataConfig(source="x", val_fraction=0.1), "vid2vid", training(["only"]))
    assert origin is None and splits(alone) == {"train": ["only"]}, "one sequence: nothing to hold out"
    none, origin = with_val_split(DataConfig(source="x"), "vid2vid", training(names))
    assert origin is None and "val" not in splits(none), "no validation unless asked for"


def test_held_out_by_name_and_unknown_names_are_errors():
    listing, origin = with_val_split(DataConfig(source="x", val_sequences=["b"]), "vid2vid", training(["a", "b", "c"]))
    assert splits(listing) == {"train": ["a", "c"], "val": ["b"]} and "by name: ['b']" in origin
    with pytest.raises(PrepareError, match=r"no training sequence named \['z'\]; the training sequences are \['a'"):
        with_val_split(DataConfig(source="x", val_sequences=["z"]), "vid2vid", training(["a", "b"]))
    with pytest.raises(ConfigError, match=r"data.val_fraction: must be in \[0, 1\)"):
        load_config(["data.val_fraction=1.5"])


def test_val_source_and_synthetic_val_sequences():
    cfg = DataConfig(source="synthetic", synthetic_sequences=2, synthetic_frames=4, resolution="32x16")
    base = make_source(cfg).list()
    listing, origin = with_val_split(DataConfig(**{**cfg.__dict__, "val_source": "synthetic"}), "synthetic", base)
    assert origin == "data.val_source=synthetic" and len(splits(listing)["val"]) == 2
    fresh = DataConfig(**{**cfg.__dict__, "synthetic_val_sequences": 3})
    listing, origin = with_val_split(fresh, "synthetic", make_source(fresh).list())
    train, val = splits(listing)["train"], splits(listing)["val"]
    assert len(train) == 2 and len(val) == 3 and not set(train) & set(val) and "unseen" in origin
    seeds = {s.seed for s in listing.sequences}
    assert len(seeds) == 5, "validation scenes are not training scenes"


@pytest.mark.ray
def test_prepare_takes_the_sources_own_val_split_along_with_train(tmp_path, ray_cluster):
    root, out = tmp_path / "data", tmp_path / "out"
    for i in range(2):
        write_seq(root, "train", f"t{i}", seed=i)
    write_seq(root, "val", "v0", seed=9)
    summary = prepare(DataConfig(source=str(root), split="train", out=str(out), resolution=f"{W}x{H}", clip_len=4,
                                 val_fraction=0.5), progress=False)
    assert summary.clips == {"train": 2, "val": 1}, "val_fraction unused: the source has its own val"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["val"]["origin"] == "the source's own 'val' split"
    assert "val: 1 clips (1 written now); the source's own 'val' split" in summary.format()
    # without a val folder: a training sequence held out by name; its clips leave the train split
    for split in ("val_A", "val_B"):
        for f in (root / split / "v0").iterdir():
            f.unlink()
        (root / split / "v0").rmdir()
        (root / split).rmdir()
    held = prepare(DataConfig(source=str(root), split="train", out=str(tmp_path / "held"), resolution=f"{W}x{H}",
                              clip_len=4, val_sequences=["t1"]), progress=False)
    assert held.clips == {"train": 1, "val": 1}
    shards = json.loads((tmp_path / "held" / "manifest.json").read_text())["shards"]
    assert sorted((s["split"], s["sequence"]) for s in shards) == [("train", "t0"), ("val", "t1")]


@pytest.mark.ray
def test_a_val_sequence_that_is_trained_on_later_leaves_the_val_split(tmp_path, ray_cluster):
    out = tmp_path / "out"
    cfg = DataConfig(source="synthetic", out=str(out), resolution=f"{W}x{H}", clip_len=4, synthetic_sequences=2,
                     synthetic_frames=4, val_fraction=0.5)
    assert prepare(cfg, progress=False).clips == {"train": 1, "val": 1}
    # now all trained on (another split choice is another data setting: it takes data.overwrite=true)
    again = prepare(DataConfig(**{**cfg.__dict__, "val_fraction": 0.0, "overwrite": True}), progress=False)
    assert again.clips == {"train": 2}, "the earlier val split overlaps the new train split: dropped"
    assert set(json.loads((out / "manifest.json").read_text())["splits"]) == {"train"}
