"""Video features on a Ray Data actor pool: one UDF class per feature net, the net loaded once per actor.

Protocol (what a reported number means):

- FID-I3D: I3D (``rgb_imagenet.pt``) Mixed_5c features averaged over time and space, 1024-d, on
  16-frame clips at 224x224 in [-1, 1] (``preprocess_clips(.., "i3d")``).
- FVD: the same I3D pass, Kinetics-400 logits of the public head (2x7x7 average pool, 1x1x1 conv)
  averaged over time, 400-d: Unterthiner et al.'s 16-frame clips at 224x224. One I3D forward gives
  both, so FVD costs no extra pass.
- FID-ResNeXt: ResNeXt-101 32x4d 3D (``resnext-101-kinetics.pth``) layer4 features averaged over
  time and space, 2048-d, on 16-frame clips at 112x112 with kenshohara's mean subtraction.

Clips shorter than 16 frames are padded by repeating the last frame (``preprocess.fit_length``).
``size`` other than the protocol's (224 / 112) is a test-only switch for slow CPUs: the protocol
input is resized down to ``size`` x ``size``; FVD then needs size >= 193 (the public head's window).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from vid2vid.eval.preprocess import SIZES, preprocess_clips

FVD_MIN_SIZE = 193  # smallest input whose Mixed_5c map covers the public 2x7x7 logits window


def feature_columns(net: str, size: int) -> list[str]:
    """Output columns of :class:`ExtractFeatures` for ``net`` (FVD logits only at sizes that allow them)."""
    if net == "i3d" and size >= FVD_MIN_SIZE:
        return ["i3d", "i3d_logits"]
    return [net]


def frames_to_input(frames: np.ndarray, net: str, size: int, device: str | torch.device = "cpu") -> torch.Tensor:
    """(B, T, H, W, 3) uint8 -> (B, 3, 16, size, size) in ``net``'s input range, on ``device`` (the
    uint8 frames move first: resizing on the GPU, and 4x fewer bytes over PCIe)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 1, 4, 2, 3).float().div(127.5).sub(1.0)
    x = preprocess_clips(x, net)
    if size != SIZES[net]:
        b, c, t, s, _ = x.shape
        flat = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, s, s)
        flat = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = flat.reshape(b, t, c, size, size).permute(0, 2, 1, 3, 4).contiguous()
    return x


class ExtractFeatures:
    """Ray Data UDF: adds ``<column>`` (B, D) float32 and ``<net>_valid`` (B,) bool to each batch.

    Rows of kind ``real`` are skipped (zeros, ``valid`` False) when ``skip_real``: their statistics
    are already cached. The last stage of the pipeline sets ``drop_frames`` so only features travel
    back to the driver.
    """

    def __init__(self, net: str, weights_path: str, size: int, skip_real: bool, drop_frames: bool,
                 expect_random: bool):
        from vid2vid.eval.feature_nets import load_feature_net

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.net = load_feature_net(net, weights_path, self.device)
        if bool(self.net.random_weights) != expect_random:  # the driver's check saw another file
            raise RuntimeError(f"{weights_path}: random-weights marker changed during evaluation")
        self.name, self.size, self.skip_real, self.drop_frames = net, size, skip_real, drop_frames
        self.columns = feature_columns(net, size)

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kinds = np.asarray(batch["kind"]).astype(str)
        valid = (kinds == "fake") | (not self.skip_real)
        n = len(kinds)
        out = {c: np.zeros((n, self._dim(c)), np.float32) for c in self.columns}
        if valid.any():
            x = frames_to_input(batch["frames"][valid], self.name, self.size, self.device)
            h = self.net.trunk(x)
            out[self.name][valid] = h.mean(dim=(2, 3, 4)).float().cpu().numpy()
            if "i3d_logits" in self.columns:
                out["i3d_logits"][valid] = self.net.logits_from_trunk(h).mean(dim=2).float().cpu().numpy()
        result = {k: v for k, v in batch.items() if not (self.drop_frames and k == "frames")}
        result.update(out)
        result[f"{self.name}_valid"] = valid
        return result

    def _dim(self, column: str) -> int:
        return self.net.num_classes if column == "i3d_logits" else self.net.feature_dim
