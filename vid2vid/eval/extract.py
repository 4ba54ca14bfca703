"""The feature metrics (a registry) and their extraction from uint8 clips, every net loaded once.

Each Fréchet metric is one (net, input protocol, feature) triple (protocols in ``preprocess.py``):

=================  ==================  ===========================  ============================
metric             net (setting)       input                        feature
=================  ==================  ===========================  ============================
``fid_i3d``        I3D (i3d_weights)   ``i3d``: 224^2, crop|whole   Mixed_5c averaged, 1024-d
``fvd``            I3D (i3d_weights)   ``fvd``: 224^2 whole, TF     time-averaged logits, 400-d
``fvd_styleganv``  StyleGAN-V I3D      ``fvd``                      logits (return_features), 400-d
``fid_resnext``    ResNeXt-101 32x4d   ``resnext101``: 112^2        layer4 averaged, 2048-d
=================  ==================  ===========================  ============================

All take 16-frame clips. The FVD protocol and the FID-I3D protocol differ in their input (whole frame
by TF's bilinear resize vs a centre crop), so I3D runs once per input it is given; each input is
built once per clip and shared by the nets that read it. ``fvd_styleganv`` uses StyleGAN-V's
covariance, which divides by N (``ddof=0``); the others divide by N - 1, as google-research's FVD
(TF-GAN) and pytorch-fid do.

``sizes`` other than the protocol's are a test-only switch for slow CPUs: the protocol input is
resized further to ``size`` x ``size``. piergiaj's logits head needs >= 193 px (its 2x7x7 window),
so ``fvd`` needs the protocol's 224 there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vid2vid.eval.preprocess import SIZES, Frame, preprocess_clips

FVD_MIN_SIZE = 193  # smallest input whose Mixed_5c map covers the public 2x7x7 logits window
NET_SETTINGS = {"i3d": "i3d_weights", "i3d_styleganv": "styleganv_i3d_weights", "resnext101": "resnext_weights"}


@dataclass(frozen=True)
class FeatureMetric:
    name: str  # the MLflow metric is eval/<name>
    net: str  # key of NET_SETTINGS
    view: str  # input protocol (preprocess.PROTOCOLS)
    dim: int
    ddof: int = 1  # covariance divisor N - ddof
    label: str = ""  # for the README table and the eval/protocol tag


METRICS = {m.name: m for m in (
    FeatureMetric("fid_i3d", "i3d", "i3d", 1024, label="FID-I3D: I3D Mixed_5c pooled, 1024-d"),
    FeatureMetric("fvd", "i3d", "fvd", 400, label="FVD: I3D (piergiaj) time-averaged logits, 400-d"),
    FeatureMetric("fvd_styleganv", "i3d_styleganv", "fvd", 400, ddof=0,
                  label="FVD: StyleGAN-V TorchScript I3D logits, 400-d, covariance / N"),
    FeatureMetric("fid_resnext", "resnext101", "resnext101", 2048, label="FID-ResNeXt: layer4 pooled, 2048-d"),
)}


def metrics_for(nets: set[str], sizes: dict[str, int] | None = None) -> list[FeatureMetric]:
    """The metrics the given nets produce (FVD from piergiaj's I3D only at >= FVD_MIN_SIZE)."""
    sizes = {**SIZES, **(sizes or {})}
    return [m for m in METRICS.values() if m.net in nets
            and not (m.name == "fvd" and sizes["fvd"] < FVD_MIN_SIZE)]


def frames_to_input(frames: np.ndarray, view: str, size: int | None = None, frame: Frame = "crop",
                    device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, 16, S, S) by the protocol ``view`` (the uint8 frames move to
    ``device`` first: resizing on the GPU, and 4x fewer bytes over PCIe)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)
    x = preprocess_clips(x, view, frame=frame)
    if size is not None and size != SIZES[view]:
        b, c, t, s, _ = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, s, s)
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = flat.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4).contiguous()
    return x


class FeatureExtractor:
    """Every feature net of an evaluation, loaded once; ``__call__`` maps uint8 clips to the features
    of each requested metric. ``paths``: net -> local weights file."""

    def __init__(self, paths: dict[str, str], metrics: list[str], sizes: dict[str, int] | None = None,
                 frame: Frame = "crop", device: str | torch.device = "cpu"):
        from vid2vid.eval.feature_nets import load_feature_net

        self.metrics = [METRICS[m] for m in metrics]
        self.sizes = {**SIZES, **(sizes or {})}
        self.frame, self.device = frame, device
        self.nets = {net: load_feature_net(net, paths[net], device) for net in {m.net for m in self.metrics}}

    @property
    def random_weights(self) -> dict[str, bool]:
        return {net: bool(getattr(n, "random_weights", False)) for net, n in self.nets.items()}

    @torch.no_grad()
    def __call__(self, frames: np.ndarray, metrics: list[str] | None = None) -> dict[str, np.ndarray]:
        """(B, T, H, W, 3) uint8 -> {metric: (B, dim) float32} for ``metrics`` (default: all)."""
        wanted = [m for m in self.metrics if metrics is None or m.name in metrics]
        out: dict[str, np.ndarray] = {}
        for view in dict.fromkeys(m.view for m in wanted):
            x = frames_to_input(frames, view, self.sizes[view], self.frame, self.device)
            trunks: dict[str, torch.Tensor] = {}  # one pass of each net per input
            for m in (m for m in wanted if m.view == view):
                net = self.nets[m.net]
                if m.net == "i3d_styleganv":
                    y = net.fvd_logits(x)
                else:
                    h = trunks[m.net] = trunks[m.net] if m.net in trunks else net.trunk(x)
                    y = net.logits_from_trunk(h).mean(dim=2) if m.name == "fvd" else h.mean(dim=(2, 3, 4))
                out[m.name] = y.float().cpu().numpy()
        return out
