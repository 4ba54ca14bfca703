"""The paper's clip-sampling operators phi_I and phi_V (section 3), as plain functions.

phi_I draws one random frame of a clip for the image discriminator; phi_V draws K frames at frame step
s (K**scale for temporal scale ``scale``) and the K-1 real flows between them for the video
discriminator. Indices are drawn with an explicit ``torch.Generator`` so that the generator rank and
the discriminator rank of a split placement draw the same frames.

Flow convention (as in the shards): ``flows[:, t]`` maps frame t to frame t-1, so
``warp(x[t-1], flows[:, t]) ~ x[t]``; ``flows[:, 0]`` is unused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vid2vid.models.warp import warp


def sample_image_indices(num_frames: int, count: int, generator: torch.Generator | None = None) -> list[int]:
    """phi_I: ``count`` distinct frame indices drawn uniformly from ``range(num_frames)``."""
    if num_frames < 1:
        raise ValueError("phi_I needs a clip of at least one frame")
    count = min(count, num_frames)
    return sorted(torch.randperm(num_frames, generator=generator)[:count].tolist())


def window_span(num_frames_d: int, frame_step: int) -> int:
    """Frames covered by a D_V window of K frames at the given frame step (first to last, inclusive)."""
    return frame_step * (num_frames_d - 1) + 1


def sample_video_window(
    num_frames: int, num_frames_d: int, frame_step: int, generator: torch.Generator | None = None
) -> list[int] | None:
    """phi_V: indices of K frames ``frame_step`` apart at a uniformly drawn position.

    Returns None when the clip is too short for this temporal scale (the temporally progressive
    schedule grows clips until every scale fits).
    """
    span = window_span(num_frames_d, frame_step)
    if span > num_frames:
        return None
    start = int(torch.randint(0, num_frames - span + 1, (1,), generator=generator))
    return [start + k * frame_step for k in range(num_frames_d)]


def compose_backward_flows(flows: Tensor, first: int, last: int) -> Tensor:
    """Flow mapping frame ``last`` to frame ``first`` (first < last), chained from consecutive flows.

    f_{last->first}(p) = f_{last->last-1}(p) + f_{last-1->first}(p + f_{last->last-1}(p)): each earlier
    consecutive flow is sampled where the accumulated flow points. This replaces the reference's
    re-run of FlowNet2 on skipped frames, since flow is computed once at preparation time.
    """
    if not 0 <= first < last < flows.shape[1]:
        raise ValueError(f"compose_backward_flows: need 0 <= first < last < {flows.shape[1]}, got {first}, {last}")
    acc = flows[:, last]
    for t in range(last - 1, first, -1):
        acc = acc + warp(flows[:, t], acc)
    return acc


@dataclass
class VideoWindow:
    """One phi_V draw: frame indices and the K-1 real flows between consecutive selected frames."""

    indices: list[int]
    flows: Tensor  # (N, K-1, 2, H, W); flows[:, j] maps frame indices[j+1] to frame indices[j]


def video_window_flows(flows: Tensor, indices: list[int]) -> Tensor:
    """Real flows between consecutive frames of a window (composed when the frame step exceeds 1)."""
    pairs = zip(indices[:-1], indices[1:], strict=True)
    return torch.stack([compose_backward_flows(flows, a, b) for a, b in pairs], dim=1)
