"""What the training step needs of an optimizer-holding wrapper, and a plain-PyTorch one.

The step talks to "engines": objects with ``__call__`` (forward), ``backward(loss)``, ``step()`` and
``module``. A DeepSpeed engine is one (:mod:`vid2vid.platform.engines` builds them); :class:`PlainEngine`
wraps a module and a torch optimizer with the same interface, so the plain-PyTorch benchmarks, the
unit tests and the Ray Train workers run the same step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

import torch
from torch import nn


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


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Turn off ``requires_grad`` on every parameter, restoring each flag as it was on exit.

    Restoring (not setting True) keeps deliberately frozen parameters, e.g. coarse scales during
    ``niter_fix_global``, frozen. Gradients still flow *through* the module to its inputs.
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
