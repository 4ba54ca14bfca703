"""Warm start of a finer run from a coarser one, and plain-weights loading of checkpoints.

The Ray Train path (a whole warm-started run) is in ``test_train.py``; here the worker's own set-up
functions build real DeepSpeed engines in this process for every ZeRO stage.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from vid2vid.checkpoints import load_generator, load_matching, save_weights
from vid2vid.config import Config, ModelConfig, load_config, to_dict
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.worker import build_engines
from vid2vid.training.sides import prepare_sides
from vid2vid.training.step import colocated_step

TINY = ModelConfig(ngf=16, n_downsample_G=2, n_blocks=2, n_blocks_local=1, ndf=8, num_D=1)


def test_a_two_scale_model_takes_the_one_scale_model_as_its_global_generator(tmp_path):
    torch.manual_seed(0)
    coarse = GeneratorSide(TINY)
    save_weights(tmp_path, "generator", coarse)
    fine = GeneratorSide(dataclasses.replace(TINY, n_scales_spatial=2))
    matched = load_matching(fine, tmp_path, "generator")
    assert matched.new and all(name.startswith("generator.scales.1.") for name in matched.new), matched.new
    assert matched.new_modules() == ["generator.scales.1"] and not matched.reshaped and not matched.unused
    assert sorted(matched.copied) == sorted(coarse.state_dict())
    for name, tensor in coarse.state_dict().items():
        assert torch.equal(fine.state_dict()[name], tensor), name


def test_a_checkpoint_of_another_model_is_an_error_naming_the_file(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "weights.pt")
    (tmp_path / "generator").mkdir()
    (tmp_path / "weights.pt").rename(tmp_path / "generator" / "weights.pt")
    with pytest.raises(ValueError, match=r"generator/weights.pt shares no tensor .* e.g. \['fc.weight'\]"):
        load_matching(GeneratorSide(TINY), tmp_path, "generator")


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


def clip(seed: int, frames: int, h: int = 16, w: int = 32) -> Clip:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 35, (1, frames, h, w), generator=gen)
    instances = torch.zeros(1, frames, h, w, dtype=torch.long)
    flow = torch.randn(1, frames, 2, h, w, generator=gen)
    flow[:, 0] = 0
    return Clip(labels, torch.zeros(1, frames, h, w), instances, torch.rand(1, frames, 3, h, w, generator=gen) * 2 - 1,
                flow, torch.ones(1, frames, 1, h, w))


# Every ZeRO stage, both resolutions, ZeRO-2 with both (the Ray Train test runs ZeRO-1 from 1 scale).
@pytest.mark.parametrize("stage, source_scales", [(0, 1), (1, 2), (2, 2), (2, 1)])
def test_a_warm_start_survives_the_engines_steps(world1, tmp_path, stage, source_scales):
    """The worker's set-up (``prepare_sides`` then ``build_engines``) and an lr=0 step through the
    DeepSpeed engines: every tensor of G and D keeps its warm-started value (ZeRO-1/2 keep their own fp32
    copy, made when the engine is built, and write it back after each step). From a 1-scale source the
    2-scale run's ``scales.0`` is the source's global generator and its new tensors their initial values."""
    cfg = load_config(["preset=smoke", "model.n_scales_spatial=2", "model.num_D=2", f"train.zero_stage={stage}",
                       "train.lr=0"])
    source = dataclasses.replace(cfg.model, n_scales_spatial=source_scales, num_D=source_scales)
    torch.manual_seed(123)  # not the run's seed: warm-started tensors differ from the fresh ones
    sources = {"generator": GeneratorSide(source), "discriminator": DiscriminatorSide(source)}
    for side, module in sources.items():
        save_weights(tmp_path, side, module)

    fresh = dict(zip(("generator", "discriminator"),
                     prepare_sides(cfg, "both", torch.device("cpu"), coarse_frozen=False), strict=True))
    g, d = prepare_sides(cfg, "both", torch.device("cpu"), coarse_frozen=False, warm_start_from=str(tmp_path))
    start = {side: {k: v.clone() for k, v in m.state_dict().items()} for side, m in (("generator", g),
                                                                                       ("discriminator", d))}
    for side, tensors in start.items():
        src = sources[side].state_dict()
        for name, value in tensors.items():
            expected = src[name] if name in src and src[name].shape == value.shape else fresh[side].state_dict()[name]
            assert torch.equal(value, expected), f"{side} {name}"
    engines = build_engines(cfg, g, d, None)
    colocated_step(engines["generator"], engines["discriminator"], Objective(cfg.model), cfg.model, clip(1, 3), 3,
                   torch.Generator().manual_seed(0))
    for side, engine in engines.items():
        changed = [k for k, v in engine.module.state_dict().items() if not torch.equal(v, start[side][k])]
        assert not changed, f"ZeRO-{stage}: {len(changed)} {side} tensors moved at lr=0, e.g. {changed[:3]}"
    scale0 = [k for k in start["generator"] if k.startswith("generator.scales.0.")]
    assert scale0 and all(torch.equal(g.state_dict()[k], sources["generator"].state_dict()[k]) for k in scale0)
    for engine in engines.values():
        engine.destroy()
