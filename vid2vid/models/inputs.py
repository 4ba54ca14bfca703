"""Label and feature plumbing shared by the generator and the discriminators.

Shapes follow the clip layout of the data pipeline: ``(N, T, ...)`` with time second.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vid2vid.config import ModelConfig


def _require_integer(name: str, t: Tensor) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name}: expected an integer tensor of label ids, got dtype {t.dtype}")


def one_hot_labels(label_ids: Tensor, label_nc: int) -> Tensor:
    """``(..., H, W)`` integer ids -> ``(..., label_nc, H, W)`` float32 one-hot."""
    _require_integer("one_hot_labels", label_ids)
    if label_ids.dim() < 2:
        raise ValueError(f"one_hot_labels: expected (..., H, W), got shape {tuple(label_ids.shape)}")
    if label_ids.numel():
        lo, hi = int(label_ids.min()), int(label_ids.max())
        if lo < 0:
            raise ValueError(f"one_hot_labels: negative label id {lo}")
        if hi >= label_nc:
            raise ValueError(
                f"one_hot_labels: label id {hi} >= label_nc={label_nc}; set model.label_nc to at least "
                f"{hi + 1} or fix the label maps"
            )
    return F.one_hot(label_ids.long(), label_nc).movedim(-1, -3).float()


def foreground_mask(label_ids: Tensor, fg_labels: Sequence[int]) -> Tensor:
    """``(..., H, W)`` ids -> ``(..., 1, H, W)`` float, 1 where the id is one of ``fg_labels``."""
    _require_integer("foreground_mask", label_ids)
    fg = torch.as_tensor(list(fg_labels), dtype=label_ids.dtype, device=label_ids.device)
    return torch.isin(label_ids, fg).unsqueeze(-3).float()


def encode_source(label_ids: Tensor, instance_edges: Tensor | None, cfg: ModelConfig) -> Tensor:
    """Source frames as G and D see them: ``(N, T, cfg.label_channels, H, W)`` float.

    ``label_ids`` is ``(N, T, H, W)`` integer ids when ``cfg.label_nc > 0``, otherwise a dense float map
    ``(N, T, input_nc, H, W)`` (edges, poses). ``instance_edges`` ``(N, T, H, W)`` is appended as one
    channel when ``cfg.use_instance``; the data pipeline always stores it, so it is simply not used
    when ``cfg.use_instance`` is off.
    """
    if cfg.label_nc > 0:
        if label_ids.dim() != 4:
            raise ValueError(f"encode_source: label ids must be (N,T,H,W), got {tuple(label_ids.shape)}")
        src = one_hot_labels(label_ids, cfg.label_nc)
    else:
        if label_ids.dim() != 5 or label_ids.shape[2] != cfg.input_nc:
            raise ValueError(
                f"encode_source: dense input must be (N,T,input_nc={cfg.input_nc},H,W), "
                f"got {tuple(label_ids.shape)}"
            )
        src = label_ids.float()
    if not cfg.use_instance:
        return src
    if instance_edges is None:
        raise ValueError("encode_source: model.use_instance is on but no instance_edges were given")
    if instance_edges.shape != src.shape[:2] + src.shape[3:]:
        raise ValueError(
            f"encode_source: instance_edges must be (N,T,H,W) = {tuple(src.shape[:2] + src.shape[3:])}, "
            f"got {tuple(instance_edges.shape)}"
        )
    return torch.cat([src, instance_edges.unsqueeze(2).to(src.dtype)], dim=2)


def downsample_pyramid(x: Tensor, n: int) -> list[Tensor]:
    """``[x, x/2, x/4, ...]`` (``n`` levels, finest first) by 3x3 stride-2 average pooling.

    ``count_include_pad=False`` so border pixels are not darkened by the zero padding. Any number of
    leading dims is accepted (``(N,C,H,W)`` or ``(N,T,C,H,W)``); pooling acts on the last two.
    """
    if n < 1:
        raise ValueError(f"downsample_pyramid: need at least one level, got n={n}")
    if x.dim() < 3:
        raise ValueError(f"downsample_pyramid: expected (..., C, H, W), got shape {tuple(x.shape)}")
    levels = [x]
    for _ in range(n - 1):
        cur = levels[-1]
        flat = cur.reshape(-1, *cur.shape[-3:])
        pooled = F.avg_pool2d(flat, 3, stride=2, padding=1, count_include_pad=False)
        levels.append(pooled.reshape(*cur.shape[:-2], *pooled.shape[-2:]))
    return levels
