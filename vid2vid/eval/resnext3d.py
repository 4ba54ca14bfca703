"""ResNeXt-101 32x4d 3D (Hara, Kataoka & Satoh, CVPR 2018), the paper's second video-FID network.

The module tree reproduces kenshohara/3D-ResNets-PyTorch's 2017 ``ResNeXt`` (cardinality 32, shortcut
type B, bottleneck expansion 2, trained on Kinetics-400 with 16-frame 112x112 clips), so the public
``resnext-101-kinetics.pth`` loads key for key once its ``module.`` prefix is removed (see
:mod:`vid2vid.eval.feature_nets`): 48,340,816 parameters, ``fc.weight`` (400, 2048).

Differences from the public module, none of which changes a number:
- ``extract`` averages layer4 over all of (T, H, W) instead of the fixed ``AvgPool3d((1, 4, 4))`` the
  public code builds from ``sample_size=112, sample_duration=16``. On a 16x112x112 clip the two are
  identical; other clip sizes work instead of failing on a too-small map.
- ``forward`` = ``fc(extract(x))``, i.e. the public ``forward`` on 16x112x112 clips: (N, 400) logits.
"""

from __future__ import annotations

from torch import Tensor, nn

LAYERS = (3, 4, 23, 3)  # ResNeXt-101
CARDINALITY = 32
EXPANSION = 2
FEATURE_DIM = 1024 * EXPANSION  # 2048
NUM_CLASSES = 400


class Bottleneck(nn.Module):
    """1x1x1 reduce -> grouped 3x3x3 (32 groups) -> 1x1x1 expand (x2), plus the shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        mid = CARDINALITY * (planes // 32)
        self.conv1 = nn.Conv3d(inplanes, mid, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm3d(mid)
        self.conv2 = nn.Conv3d(mid, mid, kernel_size=3, stride=stride, padding=1, groups=CARDINALITY,
                               bias=False)
        self.bn2 = nn.BatchNorm3d(mid)
        self.conv3 = nn.Conv3d(mid, planes * EXPANSION, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm3d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu(out + shortcut)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    # Shortcut type B: a projection (1x1x1 conv + BN) only where the shape changes.
    downsample = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(
            nn.Conv3d(inplanes, planes * EXPANSION, kernel_size=1, stride=stride, bias=False),
            nn.BatchNorm3d(planes * EXPANSION),
        )
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNeXt3D(nn.Module):
    """ResNeXt-101 32x4d 3D. Input (N, 3, T, H, W) on kenshohara's scale (see ``preprocess``)."""

    feature_dim = FEATURE_DIM
    num_classes = NUM_CLASSES

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.conv1 = nn.Conv3d(3, 64, kernel_size=7, stride=(1, 2, 2), padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool3d(kernel_size=3, stride=2, padding=1)
        widths = (128, 256, 512, 1024)
        inplanes = 64
        for i, (planes, blocks) in enumerate(zip(widths, LAYERS, strict=True)):
            setattr(self, f"layer{i + 1}", _make_layer(inplanes, planes, blocks, 1 if i == 0 else 2))
            inplanes = planes * EXPANSION
        self.fc = nn.Linear(FEATURE_DIM, num_classes)

    def trunk(self, x: Tensor) -> Tensor:
        """The layer4 feature map, (N, 2048, T/16, H/32, W/32) rounded up."""
        if x.dim() != 5 or x.shape[1] != 3:
            raise ValueError(f"ResNeXt3D expects (N, 3, T, H, W) clips, got shape {tuple(x.shape)}")
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def extract(self, x: Tensor) -> Tensor:
        """Pooled features (N, 2048): layer4 averaged over time and space."""
        return self.trunk(x).mean(dim=(2, 3, 4))

    def forward(self, x: Tensor) -> Tensor:
        """Kinetics-400 logits (N, 400), as the public model returns them."""
        return self.fc(self.extract(x))
