"""Warm start of a finer run from a coarser one, and plain-weights loading of checkpoints."""

from __future__ import annotations

import dataclasses
import json

import torch

from vid2vid.config import Config, ModelConfig, to_dict
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.warm_start import load_generator, load_matching, save_weights

TINY = ModelConfig(ngf=16, n_downsample_G=2, n_blocks=2, n_blocks_local=1, ndf=8, num_D=1)


def test_a_two_scale_model_takes_the_one_scale_model_as_its_global_generator(tmp_path):
    torch.manual_seed(0)
    coarse = GeneratorSide(TINY)
    save_weights(tmp_path, "generator", coarse)
    fine = GeneratorSide(dataclasses.replace(TINY, n_scales_spatial=2))
    new = load_matching(fine, tmp_path, "generator")
    assert new and all(name.startswith("generator.scales.1.") for name in new), new
    for name, tensor in coarse.state_dict().items():
        assert torch.equal(fine.state_dict()[name], tensor), name


def test_load_generator_rebuilds_the_model_from_a_checkpoint_folder(tmp_path):
    cfg = Config(model=TINY)
    torch.manual_seed(1)
    g = GeneratorSide(cfg.model)
    save_weights(tmp_path, "generator", g)
    (tmp_path / "config.json").write_text(json.dumps(to_dict(cfg)))
    loaded_cfg, loaded = load_generator(tmp_path)
    assert loaded_cfg.model == cfg.model and not loaded.training
    for (name, a), b in zip(g.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
