"""Composition of the vid2vid networks: the generator side, the discriminator side, and sequential
generation of a clip (eq. 3), shared by training, evaluation and the generate CLI.

The generator side (G and, for multimodal synthesis, the feature encoder E) lives here; the
discriminator side is in ``adversarial.py``. They are separate modules because they live in separate
optimisers / DeepSpeed engines, possibly on disjoint ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.models.encoder import FeatureEncoder, object_ids
from vid2vid.models.generator import GeneratorOutput, Vid2VidGenerator
from vid2vid.models.inputs import encode_source


class GeneratorSide(nn.Module):
    """G plus (when ``use_features``) the feature encoder E that feeds it instance-pooled features."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.generator = Vid2VidGenerator(cfg)
        self.encoder = FeatureEncoder(cfg) if cfg.use_features else None

    def forward(self, source: Tensor, prev_frames: Tensor | None, label_ids: Tensor | None,
                features: Tensor | None = None) -> GeneratorOutput:
        return self.generator(source, prev_frames, label_ids=label_ids, features=features)

    def encode_features(self, frames: Tensor, labels: Tensor, instances: Tensor) -> Tensor:
        """E's features of real frames (N, T, 3, H, W) -> (N, T, feat_num, H, W), pooled per object:
        (class, instance) from label ids and instance ids (N, T, H, W), so stuff classes stay apart."""
        if self.encoder is None:
            raise RuntimeError("encode_features: model.use_features is off, so no feature encoder was built")
        n, t = frames.shape[:2]
        feats = self.encoder(frames.flatten(0, 1), object_ids(labels, instances).flatten(0, 1))
        return feats.unflatten(0, (n, t))


@dataclass
class SequenceOutput:
    """A generated clip, frames stacked along dim 1: (N, T, C, H, W)."""

    frames: Tensor
    hallucinated: Tensor
    flows: Tensor | None  # (N, T, 2, H, W); flows[:, 0] is zero (frame 0 has no previous frame)
    masks: Tensor | None  # (N, T, 1, H, W); masks[:, 0] is one (frame 0 is all hallucinated)
    warped: Tensor | None  # (N, T, 3, H, W); warped[:, 0] equals frames[:, 0]


@dataclass
class ClipInputs:
    """What G needs for a clip: encoded source frames, current-frame label ids, optional features."""

    source: Tensor  # (N, T, label_channels, H, W)
    label_ids: Tensor | None  # (N, T, H, W) long; None for dense (edge / pose) sources
    features: Tensor | None = None  # (N, T, feat_num, H, W)


def prepare_inputs(cfg: ModelConfig, labels: Tensor, instance_edges: Tensor | None,
                   features: Tensor | None = None) -> ClipInputs:
    """Encode raw label ids (or a dense source map) for G and the discriminators.

    Dense sources come as (N, T, C, H, W) floats; a single-channel one (edge maps, 0/1) may come as
    (N, T, H, W), as edge->video shards store it.
    """
    if cfg.label_nc == 0 and labels.dim() == 4:
        labels = labels.float().unsqueeze(2)
    source = encode_source(labels, instance_edges if cfg.use_instance else None, cfg)
    label_ids = labels.long() if cfg.label_nc > 0 else None
    return ClipInputs(source=source, label_ids=label_ids, features=features)


def _window(x: Tensor, t: int, length: int) -> Tensor:
    """Frames t-length+1..t of x (N, T, ...), repeating frame 0 before the clip starts."""
    idx = [max(i, 0) for i in range(t - length + 1, t + 1)]
    return x[:, idx]


def generate_sequence(gen: nn.Module, cfg: ModelConfig, inputs: ClipInputs, num_frames: int | None = None,
                      prev_frames: Tensor | None = None, detach_prev: bool = True) -> SequenceOutput:
    """Generate frames sequentially (eq. 3, Markov with L = n_frames_G - 1).

    Without ``prev_frames`` the first frame comes from G's no-previous-frame path and later frames see
    the frames G made so far (the earliest repeated until L exist), exactly as at inference, so no
    separate single-image model is ever needed. ``detach_prev`` truncates back-propagation through
    previous frames (the reference's default, max_frames_backpropagate = 1).
    """
    total = inputs.source.shape[1] if num_frames is None else num_frames
    L = cfg.prev_frames
    history: list[Tensor] = [] if prev_frames is None else list(prev_frames.unbind(1))
    outs: list[GeneratorOutput] = []
    for t in range(total):
        source = _window(inputs.source, t, cfg.n_frames_G)
        feats = None if inputs.features is None else _window(inputs.features, t, cfg.n_frames_G)
        ids = None if inputs.label_ids is None else inputs.label_ids[:, t]
        prev = None
        if history:
            recent = history[-L:]
            recent = [recent[0]] * (L - len(recent)) + recent
            prev = torch.stack([p.detach() if detach_prev else p for p in recent], dim=1)
        out = gen(source, prev, ids, feats)
        outs.append(out)
        history.append(out.frame)
    return _stack_outputs(outs)


def _stack_outputs(outs: list[GeneratorOutput]) -> SequenceOutput:
    frames = torch.stack([o.frame for o in outs], dim=1)
    hallucinated = torch.stack([o.hallucinated for o in outs], dim=1)
    has_flow = any(o.flow is not None for o in outs)
    if not has_flow:
        return SequenceOutput(frames, hallucinated, None, None, None)
    ref = next(o for o in outs if o.flow is not None)
    zeros_flow = torch.zeros_like(ref.flow)
    ones_mask = torch.ones_like(ref.mask)
    flows = torch.stack([o.flow if o.flow is not None else zeros_flow for o in outs], dim=1)
    masks = torch.stack([o.mask if o.mask is not None else ones_mask for o in outs], dim=1)
    warped = torch.stack([o.warped if o.warped is not None else o.frame for o in outs], dim=1)
    return SequenceOutput(frames, hallucinated, flows, masks, warped)


def count_parameters(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
