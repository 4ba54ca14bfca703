"""One vid2vid training step (G then D), independent of how parameters are distributed.

The pieces are shared by both placements: :func:`colocated_step` runs them all on one rank; the split
placement (:mod:`vid2vid.platform.step`) runs :func:`generate` and :func:`generator_local_terms` on the
generator rank, :func:`adversarial_terms` and :func:`discriminator_step` on its partner.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vid2vid.config import ModelConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import AdversarialInputs, draw_adversarial_inputs
from vid2vid.models.objective import LossTerms, Objective
from vid2vid.models.vid2vid import SequenceOutput, generate_sequence
from vid2vid.training.engine import Engine, frozen
from vid2vid.training.inputs import PreparedClip, clip_inputs

Precision = Callable[[], contextlib.AbstractContextManager]


@dataclass
class StepResult:
    generator: LossTerms
    discriminator: LossTerms
    sequence: SequenceOutput

    @property
    def frames(self) -> int:
        """Frames generated in this step (all clips of the batch)."""
        return self.sequence.frames.shape[0] * self.sequence.frames.shape[1]


@dataclass
class Generated:
    """G's forward of one step: its inputs, its frames, and what the discriminators will judge."""

    prepared: PreparedClip
    sequence: SequenceOutput
    adversarial: AdversarialInputs


def adversarial_inputs(cfg: ModelConfig, prepared: PreparedClip, seq: SequenceOutput,
                       rng: torch.Generator, image_frames: int = 1) -> AdversarialInputs:
    """phi_I / phi_V draws over the generated frames, with the source G was given (encoded once)."""
    clip = prepared.clip
    return draw_adversarial_inputs(cfg, prepared.inputs.source, clip.frames, clip.flow, seq, rng, image_frames)


def generate(g: Engine, cfg: ModelConfig, clip: Clip, num_frames: int, rng: torch.Generator,
             image_frames: int = 1) -> Generated:
    prepared = clip_inputs(cfg, clip, num_frames, encoder=g.module)
    seq = generate_sequence(g, cfg, prepared.inputs, num_frames)
    return Generated(prepared, seq, adversarial_inputs(cfg, prepared, seq, rng, image_frames))


def generator_local_terms(objective: Objective, generated: Generated) -> LossTerms:
    """G's losses that need no discriminator (VGG, flow, warp, mask)."""
    clip = generated.prepared.clip
    return objective.generator_local(generated.sequence, clip.frames, clip.flow, clip.confidence)


def adversarial_terms(d_module: torch.nn.Module, objective: Objective, adv: AdversarialInputs) -> LossTerms:
    """G's adversarial and feature-matching losses. D is frozen and called as the bare module (not
    through its engine): that keeps the D engine's gradient hooks out of G's backward (DeepSpeed
    ZeRO-2 needs it); gradients still flow through D to the fake frames."""
    with frozen(d_module):
        return objective.generator_adversarial(d_module(adv))


def apply(engine: Engine, loss: torch.Tensor) -> None:
    engine.backward(loss)
    engine.step()


def discriminator_step(d: Engine, objective: Objective, adv: AdversarialInputs,
                       precision: Precision = contextlib.nullcontext) -> LossTerms:
    """D's step on real and fake frames, forwarded through its engine once (ZeRO-2 asserts on a
    second forward per backward)."""
    with precision():
        d_terms = objective.discriminator(d(adv.detached()))
    apply(d, d_terms.total)
    return d_terms


def colocated_step(g: Engine, d: Engine, objective: Objective, cfg: ModelConfig, clip: Clip,
                   num_frames: int, rng: torch.Generator, image_frames: int = 1,
                   precision: Precision = contextlib.nullcontext) -> StepResult:
    """G step then D step with both sides on this rank.

    ``precision`` wraps the forward passes only (bf16 autocast on GPU); backward runs outside it, as
    autocast wants.
    """
    with precision():
        generated = generate(g, cfg, clip, num_frames, rng, image_frames)
        g_adv = adversarial_terms(d.module, objective, generated.adversarial)
        g_terms = generator_local_terms(objective, generated) + g_adv
    apply(g, g_terms.total)
    d_terms = discriminator_step(d, objective, generated.adversarial, precision)
    return StepResult(g_terms, d_terms, generated.sequence)
