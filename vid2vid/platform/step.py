"""A worker's training step in either placement, built from the pieces of :mod:`vid2vid.training.step`.

Colocated: every rank runs the whole G-then-D step on its own clips. Split: a generator rank tells its
partner discriminator rank what comes next, runs G's forward and local losses while the partner
judges the fake frames, and back-propagates the partner's gradient w.r.t. those frames; the partner
(:func:`serve_discriminator_step`) steps D on the same inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from vid2vid.config import ModelConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import AdversarialInputs
from vid2vid.models.objective import LossTerms, Objective
from vid2vid.platform import handoff
from vid2vid.training.step import (
    StepResult,
    adversarial_terms,
    apply,
    colocated_step,
    discriminator_step,
    generate,
    generator_local_terms,
)

Precision = Callable[[], contextlib.AbstractContextManager]


class Step(Protocol):
    def __call__(self, clip: Clip, num_frames: int, order: handoff.Control) -> StepResult: ...
    def tell_partner(self, order: handoff.Control) -> None: ...


@dataclass
class ColocatedStep:
    engines: dict[str, Any]  # looked up at each step: the schedule may rebuild the generator's engine
    objective: Objective
    cfg: ModelConfig
    rng: torch.Generator
    precision: Precision = contextlib.nullcontext

    def __call__(self, clip: Clip, num_frames: int, order: handoff.Control) -> StepResult:
        return colocated_step(self.engines["generator"], self.engines["discriminator"], self.objective, self.cfg,
                              clip, num_frames, self.rng, precision=self.precision)

    def tell_partner(self, order: handoff.Control) -> None:
        """A colocated rank has no partner."""


@dataclass
class SplitGeneratorStep:
    engines: dict[str, Any]
    objective: Objective
    cfg: ModelConfig
    rng: torch.Generator
    partner: int  # the discriminator rank of this generator rank
    device: torch.device
    precision: Precision = contextlib.nullcontext

    def __call__(self, clip: Clip, num_frames: int, order: handoff.Control) -> StepResult:
        self.tell_partner(order)
        g = self.engines["generator"]
        with self.precision():
            generated = generate(g, self.cfg, clip, num_frames, self.rng)
        adv = generated.adversarial
        handoff.send_adversarial(adv, self.partner)
        with self.precision():  # while the partner judges the fake frames
            local = generator_local_terms(self.objective, generated)
        grads = handoff.recv_tensors(self.partner, self.device)
        apply(g, surrogate_loss(local, adv, grads))
        g_adv, d_terms = self._partner_losses(adv)
        return StepResult(local + g_adv, d_terms, generated.sequence)

    def tell_partner(self, order: handoff.Control) -> None:
        handoff.send_control(order, self.partner, self.device)

    def _partner_losses(self, adv: AdversarialInputs) -> tuple[LossTerms, LossTerms]:
        """G's adversarial terms and D's terms as the partner computed them, named for logging."""
        values = handoff.recv_tensors(self.partner, self.device)
        g_names, d_names = handoff.adversarial_names(adv, self.cfg.face_discriminator)
        return (LossTerms(dict(zip(g_names, values[0].unbind(), strict=True))),
                LossTerms(dict(zip(d_names, values[1].unbind(), strict=True))))


def fake_frames(adv: AdversarialInputs) -> list[torch.Tensor]:
    """The generated frames the discriminators judge (final, and hallucinated with flow warping)."""
    return [adv.fake] + ([adv.fake_raw] if adv.fake_raw is not None else [])


def surrogate_loss(local: LossTerms, adv: AdversarialInputs, grads: list[torch.Tensor]) -> torch.Tensor:
    """A loss whose gradient w.r.t. G's parameters is exactly that of local + adversarial losses:
    d/dtheta <fake, dL_adv/dfake> = dL_adv/dfake . dfake/dtheta (the chain rule, D's half done remotely)."""
    return local.total + sum((f * gr).sum() for f, gr in zip(fake_frames(adv), grads, strict=True))


def serve_discriminator_step(d: Any, objective: Objective, partner: int, device: torch.device,
                             precision: Precision = contextlib.nullcontext) -> LossTerms:
    """The discriminator rank's half of a split step: return dL_adv/dfake, then step D on the same inputs."""
    adv = handoff.recv_adversarial(partner, device)
    with precision():
        g_adv = adversarial_terms(d.module, objective, adv)
    grads = torch.autograd.grad(g_adv.total, fake_frames(adv))
    handoff.send_tensors(list(grads), partner)  # G back-propagates while D takes its own step
    d_terms = discriminator_step(d, objective, adv, precision)
    handoff.send_tensors([torch.stack(list(g_adv.terms.values())).detach(),
                          torch.stack(list(d_terms.terms.values())).detach()], partner)
    return d_terms
