"""The generator and discriminator modules of a rank, built, warm-started and frozen as the schedule
wants before any engine (DeepSpeed's or :class:`~vid2vid.training.engine.PlainEngine`) wraps them."""

from __future__ import annotations

import logging

import torch

from vid2vid.checkpoints import load_matching
from vid2vid.config import Config
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.training.schedule import plan_epoch

log = logging.getLogger("vid2vid.train")


def build_sides(cfg: Config, role: str, device: torch.device) -> tuple[GeneratorSide | None, DiscriminatorSide | None]:
    """Both sides seeded the same way on every rank and in every placement, so G and D start from the
    same weights whichever mode runs them."""
    torch.manual_seed(cfg.train.seed)
    g = GeneratorSide(cfg.model).to(device)
    torch.manual_seed(cfg.train.seed + 1)
    d = DiscriminatorSide(cfg.model).to(device)
    return (g if role in ("both", "generator") else None), (d if role in ("both", "discriminator") else None)


def initial_coarse_frozen(cfg: Config) -> bool:
    """Whether a fresh run starts with its coarse scales frozen (epoch 0 of the schedule)."""
    return plan_epoch(0, cfg.train).coarse_frozen


def prepare_sides(cfg: Config, role: str, device: torch.device, coarse_frozen: bool,
                  warm_start_from: str | None = None, log_rank: bool = True):
    """The modules of this rank, warm-started and frozen as they must be BEFORE the engines exist.

    DeepSpeed's ZeRO-1/2 optimizer copies the trainable weights into its own fp32 partition at
    ``initialize`` and writes that copy back after every step: weights loaded into the module later
    would be undone by the first step. The frozen coarse scales decide which parameters Adam holds,
    so they too are set first (from the checkpoint on a resume, from epoch 0 of the schedule otherwise).
    """
    g, d = build_sides(cfg, role, device)
    if warm_start_from:
        for name, side in (("generator", g), ("discriminator", d)):
            if side is not None:
                matched = load_matching(side, warm_start_from, name)
                if log_rank:
                    log.warning("warm start %s from %s: %d tensors loaded, %d kept as initialised in %s",
                                name, warm_start_from, len(matched.copied), len(matched.new + matched.reshaped),
                                ", ".join(matched.new_modules()) or "none")
    if g is not None:
        g.generator.freeze_coarse_scales(coarse_frozen)
    return g, d
