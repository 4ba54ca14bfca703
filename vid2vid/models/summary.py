"""Parameter counts per sub-network, built on the meta device so a 415M-parameter preset costs no memory."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vid2vid.config import ModelConfig
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.vid2vid import GeneratorSide, count_parameters


@dataclass
class SummaryRow:
    name: str
    parameters: int
    depth: int  # 0 = side total, 1 = network, 2 = branch


@dataclass
class ModelSummary:
    rows: list[SummaryRow]
    generator_total: int
    discriminator_total: int


def _branches(prefix: str, module: nn.Module, depth: int) -> list[SummaryRow]:
    rows = [SummaryRow(prefix, count_parameters(module), depth)]
    for name, child in module.named_children():
        n = count_parameters(child)
        if n:
            rows.append(SummaryRow(f"{prefix}.{name}", n, depth + 1))
    return rows


def summarize(cfg: ModelConfig) -> ModelSummary:
    with torch.device("meta"):
        g = GeneratorSide(cfg)
        d = DiscriminatorSide(cfg)
    rows = [SummaryRow("generator side", count_parameters(g), 0)]
    for i, scale in enumerate(g.generator.scales):
        label = "global" if i == 0 else "local"
        rows += _branches(f"G{i} ({label}, ngf {cfg.ngf // 2**i})", scale, 1)
    if g.encoder is not None:
        rows.append(SummaryRow("E (feature encoder)", count_parameters(g.encoder), 1))
    rows.append(SummaryRow("discriminator side", count_parameters(d), 0))
    rows.append(SummaryRow(f"D_I ({cfg.num_D} scales)", count_parameters(d.image), 1))
    if d.video is not None:
        for s, net in enumerate(d.video.temporal):
            rows.append(SummaryRow(f"D_V{s} (frame step {cfg.n_frames_D**s})", count_parameters(net), 1))
    return ModelSummary(rows, count_parameters(g), count_parameters(d))


def format_summary(summary: ModelSummary, title: str = "vid2vid model summary") -> str:
    width = max(len("  " * r.depth + r.name) for r in summary.rows) + 2
    lines = [title, "-" * (width + 16)]
    for r in summary.rows:
        lines.append(f"{'  ' * r.depth + r.name:<{width}}{r.parameters:>14,}")
    lines.append("-" * (width + 16))
    lines.append(f"{'total':<{width}}{summary.generator_total + summary.discriminator_total:>14,}")
    return "\n".join(lines)
