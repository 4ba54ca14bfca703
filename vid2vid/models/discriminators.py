"""Discriminators: multi-scale PatchGAN, conditional image D_I and multi-frame-rate video D_V.

D_I sees (source frame, image) pairs; D_V sees K frames plus the K-1 *real* optical flows between
them, at several frame rates (frame step K**s for temporal scale s), as in the paper (sec. 3.2) and
the reference code. Every D returns all intermediate features so that the generator can use the
feature-matching loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

from vid2vid.config import ModelConfig

MAX_CHANNELS = 512


@dataclass
class DiscriminatorOutput:
    """``features[s]``: outputs of every layer of spatial scale ``s``; the last is the patch logits."""

    features: list[list[Tensor]]

    @property
    def predictions(self) -> list[Tensor]:
        return [f[-1] for f in self.features]


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if norm == "batch":
        return nn.BatchNorm2d(channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"norm: expected 'instance', 'batch' or 'none', got {norm!r}")


class NLayerDiscriminator(nn.Module):
    """PatchGAN: n_layers stride-2 4x4 convs, one stride-1 conv, a 1-channel stride-1 conv.

    Padding 2 (not 1) as the reference, so each 4x4 conv grows the map by one pixel. Each block is
    a separate child so that ``forward`` can return every intermediate feature.
    """

    def __init__(self, input_nc: int, ndf: int, n_layers: int, norm: str, spectral_norm: bool):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers_D must be >= 1, got {n_layers}")
        sn = _spectral_norm if spectral_norm else (lambda m: m)

        def conv(c_in: int, c_out: int, stride: int) -> nn.Conv2d:
            return sn(nn.Conv2d(c_in, c_out, kernel_size=4, stride=stride, padding=2))

        blocks = [nn.Sequential(conv(input_nc, ndf, 2), nn.LeakyReLU(0.2))]  # no norm on layer 1
        nf = ndf
        for i in range(1, n_layers + 1):
            nf_prev, nf = nf, min(nf * 2, MAX_CHANNELS)
            stride = 2 if i < n_layers else 1
            blocks.append(nn.Sequential(conv(nf_prev, nf, stride), _norm_layer(norm, nf), nn.LeakyReLU(0.2)))
        blocks.append(nn.Sequential(conv(nf, 1, 1)))
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = []
        for block in self.blocks:
            x = block(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """``num_D`` independent PatchGANs on the input at full, 1/2, 1/4 ... resolution."""

    def __init__(self, input_nc: int, ndf: int, n_layers: int, num_D: int, norm: str, spectral_norm: bool):
        super().__init__()
        if num_D < 1:
            raise ValueError(f"num_D must be >= 1, got {num_D}")
        self.input_nc = input_nc
        self.scales = nn.ModuleList(
            NLayerDiscriminator(input_nc, ndf, n_layers, norm, spectral_norm) for _ in range(num_D))

    def forward(self, x: Tensor) -> DiscriminatorOutput:
        if x.dim() != 4 or x.shape[1] != self.input_nc:
            raise ValueError(f"discriminator input: expected (N, {self.input_nc}, H, W), "
                             f"got {tuple(x.shape)}")
        features = []
        for i, d in enumerate(self.scales):
            if i > 0:
                # count_include_pad=False: border pixels are not darkened by the zero padding.
                x = F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
            features.append(d(x))
        return DiscriminatorOutput(features)


def _multiscale(cfg: ModelConfig, input_nc: int, num_D: int | None = None) -> MultiscaleDiscriminator:
    return MultiscaleDiscriminator(input_nc, cfg.ndf, cfg.n_layers_D, cfg.num_D if num_D is None else num_D,
                                   cfg.norm, cfg.spectral_norm)


def face_num_D(cfg: ModelConfig) -> int:
    """Scales of the face discriminator: a crop is small, so two fewer than D_I (the reference's)."""
    return max(1, cfg.num_D - 2)


class ImageDiscriminator(nn.Module):
    """D_I: conditional PatchGAN on cat(source frame, image). The face discriminator is one too, on
    face crops, with ``num_D = face_num_D(cfg)``."""

    def __init__(self, cfg: ModelConfig, num_D: int | None = None):
        super().__init__()
        self.source_nc, self.image_nc = cfg.label_channels, cfg.output_nc
        self.net = _multiscale(cfg, self.source_nc + self.image_nc, num_D)

    def forward(self, source: Tensor, image: Tensor) -> DiscriminatorOutput:
        if image.dim() != 4 or image.shape[1] != self.image_nc:
            raise ValueError(f"D_I image: expected (N, {self.image_nc}, H, W), got {tuple(image.shape)}")
        n, _, h, w = image.shape
        if tuple(source.shape) != (n, self.source_nc, h, w):
            raise ValueError(f"D_I source: expected {(n, self.source_nc, h, w)} "
                             f"(N, label_channels, H, W), got {tuple(source.shape)}")
        return self.net(torch.cat([source, image], dim=1))


class VideoDiscriminator(nn.Module):
    """D_V: one multiscale PatchGAN per temporal scale, on K frames + K-1 real flows.

    The flows are in pixels; they are divided by ``cfg.flow_multiplier`` (20) to bring them to
    roughly unit range next to images in [-1, 1], as the reference does.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.K = cfg.n_frames_D
        self.image_nc = cfg.output_nc
        self.flow_scale = cfg.flow_multiplier
        self.input_nc = self.image_nc * self.K + 2 * (self.K - 1)
        self.temporal = nn.ModuleList(_multiscale(cfg, self.input_nc) for _ in range(cfg.n_scales_temporal))

    def frame_step(self, scale: int) -> int:
        """Frames between consecutive frames of a window at temporal scale ``scale`` (K**scale)."""
        return self.K ** scale

    def forward(self, frames: Tensor, flows: Tensor, scale: int) -> DiscriminatorOutput:
        if not 0 <= scale < len(self.temporal):
            raise ValueError(f"D_V scale {scale} out of range: {len(self.temporal)} temporal scale(s)")
        K, c = self.K, self.image_nc
        if frames.dim() != 5 or frames.shape[1:3] != (K, c):
            raise ValueError(f"D_V frames: expected (N, {K}, {c}, H, W) (K = n_frames_D = {K}), "
                             f"got {tuple(frames.shape)}")
        n, _, _, h, w = frames.shape
        if tuple(flows.shape) != (n, K - 1, 2, h, w):
            raise ValueError(f"D_V flows: expected {(n, K - 1, 2, h, w)} (N, K-1, 2, H, W), "
                             f"got {tuple(flows.shape)}")
        flows = flows.reshape(n, 2 * (K - 1), h, w) / self.flow_scale
        x = torch.cat([frames.reshape(n, K * c, h, w), flows], dim=1)
        return self.temporal[scale](x)
