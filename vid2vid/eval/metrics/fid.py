"""FID over video features, the paper's metrics: I3D's Mixed_5c and ResNeXt-101's layer4, pooled.

Both read a centre crop (or, with ``eval.fid_frame=whole``, the whole frame) of 16-frame clips:
224^2 for I3D in [-1, 1], 112^2 for ResNeXt on kenshohara's mean-subtracted 0-255 scale
(``preprocess.py``). Covariances divide by N - 1, as pytorch-fid does.
"""

from __future__ import annotations

from torch import Tensor

from vid2vid.eval.i3d import InceptionI3d
from vid2vid.eval.metrics.spec import FeatureMetric, NetPass
from vid2vid.eval.resnext3d import ResNeXt3D


def pooled_trunk(p: NetPass) -> Tensor:
    """The trunk's last feature map averaged over time and space: (B, C)."""
    return p.trunk.mean(dim=(2, 3, 4))


FID_I3D = FeatureMetric("fid_i3d", "i3d", "i3d", InceptionI3d.feature_dim, pooled_trunk,
                        label="FID-I3D: I3D Mixed_5c pooled, 1024-d")
FID_RESNEXT = FeatureMetric("fid_resnext", "resnext101", "resnext101", ResNeXt3D.feature_dim, pooled_trunk,
                            label="FID-ResNeXt: layer4 pooled, 2048-d")
