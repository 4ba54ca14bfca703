"""A clip cut to the frames a step (or an evaluation, or a sample video) generates, with G's inputs
encoded once: the generator and the discriminators read the same encoded source."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.vid2vid import ClipInputs, prepare_inputs


@dataclass
class PreparedClip:
    clip: Clip  # the first ``n`` frames of the clip (views, no copy)
    inputs: ClipInputs  # G's inputs for those frames: the encoded source, label ids, features

    @property
    def num_frames(self) -> int:
        return self.clip.num_frames


def clip_inputs(cfg: ModelConfig, clip: Clip, n: int, encoder: nn.Module | None = None,
                features: Tensor | None = None) -> PreparedClip:
    """Cut ``clip`` to its first ``n`` frames and encode them for G.

    A multimodal model (``cfg.use_features``) takes per-object features: ``features`` when given (the
    style draws of an evaluation), else ``encoder.encode_features`` of the real frames (training and
    its sample video reconstruct the real appearance).
    """
    cut = clip.slice(0, n)
    if features is None and cfg.use_features and encoder is not None:
        features = encoder.encode_features(cut.frames, cut.labels, cut.instances)
    return PreparedClip(cut, prepare_inputs(cfg, cut.labels, cut.instance_edges, features))
