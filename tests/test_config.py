"""Typed config: presets, overrides, and errors that name the key."""

from __future__ import annotations

import pytest

from vid2vid.cli import main
from vid2vid.config import (
    Config,
    ConfigError,
    apply_mapping,
    flatten,
    load_config,
    parse_overrides,
    parse_resolution,
    split_key_values,
)


def test_overrides_are_typed_and_apply_after_the_preset():
    cfg = load_config(["preset=smoke", "model.ngf=8", "train.lr=1e-4", "model.fg_labels=[24,26]",
                       "train.tracking_uri=null", "data.resolution=64x32"])
    assert cfg.name == "smoke" and cfg.model.ngf == 8 and cfg.train.lr == pytest.approx(1e-4)
    assert cfg.model.fg_labels == [24, 26] and cfg.train.tracking_uri is None
    assert cfg.data.size == (64, 32)
    assert cfg.model.n_blocks == 4  # from the preset


def test_preset_inheritance_resolves_the_whole_chain():
    cfg = load_config(["preset=cityscapes_2048"])
    assert (cfg.model.n_scales_spatial, cfg.model.num_D, cfg.data.resolution) == (3, 4, "2048x1024")
    assert cfg.model.ngf == 128 and cfg.train.placement == "split"  # from cityscapes_512


@pytest.mark.parametrize("arg, message", [
    ("model.nfg=3", "unknown key 'model.nfg'; valid keys: model.label_nc"),
    ("modle.ngf=3", "unknown key 'modle'; valid keys: name, model, data, train, eval"),
    ("model.ngf=many", "model.ngf: expected an integer, got 'many'"),
    ("model.use_instance=3", "model.use_instance: expected true or false, got 3"),
    ("model.norm=group", "model.norm: 'group' is not one of ['instance', 'batch', 'none']"),
    ("model.ngf.x=3", "model.ngf is a value, not a section"),
    ("model.n_scales_spatial=4", "model.n_scales_spatial: must be 1, 2 or 3"),
    ("preset=nope", "preset 'nope': no file"),
    ("ngf", "override 'ngf' is not of the form key=value"),
])
def test_bad_keys_and_values_name_the_key(arg, message):
    with pytest.raises(ConfigError) as err:
        load_config([arg])
    assert message in str(err.value)


def test_one_tokenizer_bare_section_keys_and_the_commands_own_noun():
    assert parse_overrides(["ngf=8", "name=x", "lr=1e-4", "train.lr=1e-4", "out=a=b"], default_section="model") == {
        "model.ngf": 8, "name": "x", "lr": 1e-4, "train.lr": 1e-4, "out": "a=b"}  # lr is no model key
    with pytest.raises(ConfigError, match="argument 'ngf' is not of the form key=value"):
        split_key_values(["ngf"], noun="argument")


def test_a_retired_key_in_an_old_config_file_is_skipped_but_is_no_override():
    cfg = apply_mapping(Config(), {"train": {"sample_every": 100, "lr": 1e-3}})
    assert cfg.train.lr == 1e-3 and "train.sample_every" not in flatten(cfg)
    with pytest.raises(ConfigError, match="unknown key 'train.sample_every'"):
        load_config(["train.sample_every=100"])


def test_resolution_is_checked():
    assert parse_resolution("512x256") == (512, 256)
    with pytest.raises(ConfigError, match="WIDTHxHEIGHT"):
        parse_resolution("512")


def test_flatten_gives_every_leaf_once():
    flat = flatten(Config())
    assert flat["model.ngf"] == 128 and flat["train.lr"] == 2e-4 and "model" not in flat


def test_cli_lists_only_working_subcommands_and_reports_config_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "model-summary" in out and "prepare" in out
    assert main(["model-summary", "preset=smoke", "ngf=oops"]) == 2
    assert "model.ngf: expected an integer" in capsys.readouterr().err


def test_model_summary_counts_the_paper_sized_generator(capsys):
    assert main(["model-summary", "preset=cityscapes_2048"]) == 0
    out = capsys.readouterr().out
    assert "generator side                            415,018,411" in out
    assert "D_V1 (frame step 3)" in out
