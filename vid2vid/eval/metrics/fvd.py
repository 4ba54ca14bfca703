"""FVD: the Fréchet distance of I3D's 400 Kinetics logits, as google-research's FVD computes it.

Both formats read the FVD protocol's input (the whole frame, 224^2 by TF's bilinear resize, [-1, 1],
16 frames; ``preprocess.py``). ``fvd`` is piergiaj's PyTorch I3D with its logits averaged over time;
its head's 2x7x7 window needs an input of at least 193 px. ``fvd_styleganv`` is StyleGAN-V's
TorchScript I3D (its ``return_features`` logits) with StyleGAN-V's covariance, which divides by N
(``ddof=0``); ``fvd`` divides by N - 1, as TF-GAN does.
"""

from __future__ import annotations

from torch import Tensor

from vid2vid.eval.i3d import InceptionI3d
from vid2vid.eval.metrics.spec import FeatureMetric, NetPass

FVD_MIN_SIZE = 193  # smallest input whose Mixed_5c map covers the public 2x7x7 logits window


def time_averaged_logits(p: NetPass) -> Tensor:
    return p.net.logits_from_trunk(p.trunk).mean(dim=2)


def styleganv_logits(p: NetPass) -> Tensor:
    return p.net.fvd_logits(p.x)


FVD = FeatureMetric("fvd", "i3d", "fvd", InceptionI3d.num_classes, time_averaged_logits,
                    label="FVD: I3D (piergiaj) time-averaged logits, 400-d", min_input=FVD_MIN_SIZE,
                    too_small="FVD needs I3D inputs of at least {min}px (the public logits window); "
                              "this evaluation uses {size}px")
FVD_STYLEGANV = FeatureMetric("fvd_styleganv", "i3d_styleganv", "fvd", InceptionI3d.num_classes, styleganv_logits,
                              ddof=0, label="FVD: StyleGAN-V TorchScript I3D logits, 400-d, covariance / N")
