"""The first frames of a clip are trained on every step, like every other frame (README, "First frames").

Frame 0 comes from G's no-previous-frame path, the path every generated video starts with; frames
1..L-1 see a history padded with frame 0. Previous frames enter G detached, so no later frame's loss
reaches them: each needs a loss of its own on every step.
"""

from __future__ import annotations

import pytest
import torch

from vid2vid.config import load_config
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.training.engine import PlainEngine
from vid2vid.training.step import colocated_step

T, H, W = 4, 16, 32


def clip(seed: int) -> Clip:
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 35, (1, T, H, W), generator=gen)
    labels[:, :, 4:12, 8:24] = 26  # a car: the foreground branch has pixels
    instances = torch.zeros(1, T, H, W, dtype=torch.long)
    instances[:, :, 4:12, 8:24] = 1
    flow = torch.randn(1, T, 2, H, W, generator=gen)
    flow[:, 0] = 0
    return Clip(labels, torch.zeros(1, T, H, W), instances, torch.rand(1, T, 3, H, W, generator=gen) * 2 - 1, flow,
                torch.ones(1, T, 1, H, W))


class FirstFrameGradients:
    """Per step, the gradient that reaches G's parameters through each first frame's own forward pass.

    A tensor hook on the frame G returns for t < L computes, while the step's backward runs, the
    vector-Jacobian product of that frame's call alone (``autograd.grad`` over its subgraph)."""

    def __init__(self, g: GeneratorSide, first: int):
        self.g, self.first, self.calls = g, first, 0
        self.norms: list[dict[int, float]] = []
        g.register_forward_hook(self._forward)

    def new_step(self) -> None:
        self.calls = 0
        self.norms.append({})

    def _forward(self, module, args, out) -> None:
        t, self.calls = self.calls, self.calls + 1
        if t >= self.first or not out.frame.requires_grad:
            return
        params = [p for p in self.g.parameters() if p.requires_grad]
        step = self.norms[-1]
        step[t] = 0.0

        def through_this_frame(grad: torch.Tensor) -> None:
            handle.remove()  # the inner backward starts at this tensor: it would call this hook again
            grads = torch.autograd.grad(out.frame, params, grad, retain_graph=True, allow_unused=True)
            step[t] = float(sum(x.norm() ** 2 for x in grads if x is not None) ** 0.5)

        handle = out.frame.register_hook(through_this_frame)


@pytest.mark.parametrize("flow_warping", [True, False])
def test_first_frames_get_gradient_on_every_step(flow_warping):
    """Six steps of the worker's colocated step, phi_I/phi_V drawn as in training, on a small full model
    (fg/bg prior, flow warping, D_I and two D_V scales). Without flow warping (the ablation) frames 1..
    have no per-frame loss but the GAN terms, and frame 0 still has its D_I term on every step."""
    cfg = load_config(["preset=smoke", "model.ngf=8", "model.n_blocks=2", "model.ndf=8",
                       f"model.flow_warping={str(flow_warping).lower()}"]).model
    torch.manual_seed(0)
    g, d = GeneratorSide(cfg), DiscriminatorSide(cfg)
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    objective, rng = Objective(cfg), torch.Generator().manual_seed(0)
    first = cfg.prev_frames if flow_warping else 1
    hooks = FirstFrameGradients(g, first)
    for seed in range(6):
        hooks.new_step()
        colocated_step(ge, de, objective, cfg, clip(seed), T, rng)
    assert len(hooks.norms) == 6
    for step, norms in enumerate(hooks.norms):
        assert sorted(norms) == list(range(first)), step
        for t, norm in norms.items():
            assert norm > 0, f"step {step}: no gradient reached G's parameters through frame {t}"
