"""One vid2vid training step (G then D), independent of how parameters are distributed.

The step talks to "engines": objects with ``__call__`` (forward), ``backward(loss)``, ``step()`` and
``module``. A DeepSpeed engine is one; :class:`PlainEngine` wraps a module and a torch optimizer with
the same interface, so the plain-PyTorch benchmark, the unit tests and the Ray Train workers run the
same code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from vid2vid.config import ModelConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import AdversarialInputs, draw_adversarial_inputs
from vid2vid.models.objective import LossTerms, Objective
from vid2vid.models.vid2vid import ClipInputs, SequenceOutput, generate_sequence, prepare_inputs
from vid2vid.platform.engines import frozen


class Engine(Protocol):
    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> None: ...


class PlainEngine:
    """A module and its optimizer behind the DeepSpeed engine interface used by the train step."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = grad_clip

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class StepResult:
    generator: LossTerms
    discriminator: LossTerms
    frames: int  # frames generated in this step (all clips of the batch)
    sequence: SequenceOutput


def generate_for_training(g: Engine, cfg: ModelConfig, clip: Clip, num_frames: int) -> SequenceOutput:
    features = None
    if cfg.use_features:
        features = g.module.encode_features(clip.frames[:, :num_frames], clip.labels[:, :num_frames],
                                            clip.instances[:, :num_frames])
    inputs: ClipInputs = prepare_inputs(cfg, clip.labels[:, :num_frames],
                                        None if clip.instance_edges is None else clip.instance_edges[:, :num_frames],
                                        features)
    return generate_sequence(g, cfg, inputs, num_frames)


def adversarial_inputs(cfg: ModelConfig, clip: Clip, seq: SequenceOutput,
                       rng: torch.Generator, image_frames: int = 1) -> AdversarialInputs:
    T = seq.frames.shape[1]
    edges = None if clip.instance_edges is None else clip.instance_edges[:, :T]
    sources = prepare_inputs(cfg, clip.labels[:, :T], edges).source
    return draw_adversarial_inputs(cfg, sources, clip.frames, clip.flow, seq, rng, image_frames)


def colocated_step(g: Engine, d: Engine, objective: Objective, cfg: ModelConfig, clip: Clip,
                   num_frames: int, rng: torch.Generator, image_frames: int = 1,
                   precision: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> StepResult:
    """G step then D step with both sides on this rank.

    In the G step the discriminators are frozen and called as the bare module (not through their
    engine): that keeps the D engine's gradient hooks out of G's backward (DeepSpeed ZeRO-2 needs it).
    ``precision`` wraps the forward passes only (bf16 autocast on GPU); backward runs outside it, as
    autocast wants.
    """
    with precision():
        seq = generate_for_training(g, cfg, clip, num_frames)
        adv = adversarial_inputs(cfg, clip, seq, rng, image_frames)
        with frozen(d.module):
            judgement = d.module(adv)
        g_terms = objective.generator_local(seq, clip.frames, clip.flow, clip.confidence)
        g_terms = g_terms + objective.generator_adversarial(judgement)
    g.backward(g_terms.total)
    g.step()

    with precision():
        d_terms = objective.discriminator(d(adv.detached()))
    d.backward(d_terms.total)
    d.step()
    return StepResult(g_terms, d_terms, frames=seq.frames.shape[0] * seq.frames.shape[1], sequence=seq)
