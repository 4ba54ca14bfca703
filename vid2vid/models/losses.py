"""Training losses: GAN (LSGAN or hinge), D feature matching, VGG perceptual, flow, warp, mask.

Weights default to the reference values (``ModelConfig`` defaults); each loss already includes
its weight, so the training loop only sums. Flow convention: ``gt_flow`` of frame t maps frame t
to frame t-1 pixels, so ``warp(x_{t-1}, flow_t) ~ x_t``; ``conf`` in [0, 1], shape (N, 1, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vid2vid.models.discriminators import DiscriminatorOutput
from vid2vid.models.vgg import VGG19
from vid2vid.models.warp import warp

VGG_LAYER_WEIGHTS = (1 / 32, 1 / 16, 1 / 8, 1 / 4, 1.0)  # relu1_1 .. relu5_1, as the reference
VGG_MAX_WIDTH = 1024  # images are halved while wider than this (2K frames -> 1024x512)
# torchvision's ImageNet statistics, for images in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GANLoss(nn.Module):
    """Adversarial loss summed over the D's spatial scales.

    The reference passed ``gan_mode`` into a boolean ``use_lsgan`` so it was always LSGAN; here the
    mode is honoured. ``ls``: MSE to 1 (real) / 0 (fake), the same for D and G. ``hinge``: D uses
    mean(relu(1 - x)) on real and mean(relu(1 + x)) on fake; G uses -mean(x).
    """

    def __init__(self, mode: str = "ls"):
        super().__init__()
        if mode not in ("ls", "hinge"):
            raise ValueError(f"gan_mode: expected 'ls' or 'hinge', got {mode!r}")
        self.mode = mode

    def _one(self, x: Tensor, target_is_real: bool, for_discriminator: bool) -> Tensor:
        if self.mode == "ls":
            return F.mse_loss(x, torch.full_like(x, 1.0 if target_is_real else 0.0))
        if not for_discriminator:
            if not target_is_real:
                raise ValueError("hinge GAN loss: the generator loss is defined only for target_is_real=True")
            return -x.mean()
        return F.relu(1 - x).mean() if target_is_real else F.relu(1 + x).mean()

    def forward(self, out: DiscriminatorOutput, target_is_real: bool, for_discriminator: bool) -> Tensor:
        return sum(self._one(p, target_is_real, for_discriminator) for p in out.predictions)


class FeatureMatchingLoss(nn.Module):
    """L1 between fake and (detached) real D features, every layer but the prediction.

    Per-layer weight ``lambda_feat * 4/(n_layers_D+1) / num_D`` (the reference): the n_layers_D+1
    matched layers of one scale sum to 4 * lambda_feat / num_D.
    """

    def __init__(self, lambda_feat: float = 10.0, n_layers_D: int = 3, num_D: int = 2):
        super().__init__()
        self.layer_weight = lambda_feat * (4.0 / (n_layers_D + 1)) / num_D

    def forward(self, fake: DiscriminatorOutput, real: DiscriminatorOutput) -> Tensor:
        counts = ([len(f) for f in fake.features], [len(r) for r in real.features])
        if counts[0] != counts[1]:
            raise ValueError(f"feature matching: features per D scale differ: "
                             f"fake {counts[0]}, real {counts[1]}")
        total = fake.features[0][0].new_zeros(())
        for f_scale, r_scale in zip(fake.features, real.features, strict=True):
            for f, r in zip(f_scale[:-1], r_scale[:-1], strict=True):
                total = total + self.layer_weight * F.l1_loss(f, r.detach())
        return total


def downsample_for_vgg(x: Tensor) -> Tensor:
    """AvgPool-2 while width > 1024, as the reference (bounds VGG memory at 2K)."""
    while x.shape[-1] > VGG_MAX_WIDTH:
        x = F.avg_pool2d(x, kernel_size=2)
    return x


class VGGLoss(nn.Module):
    """Weighted L1 between VGG19 relu1_1..relu5_1 features of fake and real, x ``weight``.

    Inputs are images in [-1, 1]. Unlike the reference (which fed [-1, 1] straight into an
    ImageNet-trained VGG), they are mapped to [0, 1] and ImageNet-normalised: that is the input
    distribution the public torchvision weights were trained on, so their features are meaningful.
    """

    def __init__(self, vgg: VGG19, weight: float = 10.0):
        super().__init__()
        self.vgg = vgg
        self.weight = weight
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGLoss:
        super().train(mode)
        self.vgg.eval()  # a frozen feature net: never in training mode
        return self

    def _normalise(self, x: Tensor) -> Tensor:
        x = ((x.float() + 1) / 2 - self.mean) / self.std
        return x.to(self.vgg.features[0].weight.dtype)  # follow the VGG's precision (bf16 engines)

    def forward(self, fake: Tensor, real: Tensor) -> Tensor:
        if fake.shape != real.shape:
            raise ValueError(f"VGG loss: fake {tuple(fake.shape)} and real {tuple(real.shape)} differ")
        f_feats = self.vgg(self._normalise(downsample_for_vgg(fake)))
        with torch.no_grad():
            r_feats = self.vgg(self._normalise(downsample_for_vgg(real)))
        loss = sum(w * F.l1_loss(f, r) for w, f, r in zip(VGG_LAYER_WEIGHTS, f_feats, r_feats, strict=True))
        return self.weight * loss


def masked_l1(a: Tensor, b: Tensor, mask: Tensor | None) -> Tensor:
    """mean(|a - b| * mask) over all elements, the mask broadcast over channels (the reference's
    MaskedL1Loss); plain mean L1 when ``mask`` is None."""
    if a.shape != b.shape:
        raise ValueError(f"masked_l1: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    diff = (a - b).abs()
    if mask is None:
        return diff.mean()
    if mask.dim() != a.dim() or mask.shape[0] != a.shape[0] or mask.shape[1] not in (1, a.shape[1]) \
            or mask.shape[2:] != a.shape[2:]:
        raise ValueError(f"masked_l1: mask {tuple(mask.shape)} does not fit tensors {tuple(a.shape)}; "
                         f"expected (N, 1 or C, H, W)")
    return (diff * mask).mean()


@dataclass
class FlowLossTerms:
    endpoint: Tensor  # weighted masked L1 between predicted and ground-truth flow
    warp: Tensor  # weighted masked L1 between warp(real_prev, predicted flow) and real_cur


class FlowLoss(nn.Module):
    """Eq. 8 of the paper, confidence-masked: flow endpoint error + warping error, each x weight."""

    def __init__(self, weight: float = 10.0):
        super().__init__()
        self.weight = weight

    def forward(self, pred_flow: Tensor, gt_flow: Tensor, real_prev: Tensor, real_cur: Tensor,
                conf: Tensor) -> FlowLossTerms:
        endpoint = masked_l1(pred_flow, gt_flow, conf)
        warped = masked_l1(warp(real_prev, pred_flow), real_cur, conf)
        return FlowLossTerms(endpoint=self.weight * endpoint, warp=self.weight * warped)


class TemporalWarpLoss(nn.Module):
    """Pull the generated frame towards the previous generated frame warped by the real flow.

    The warped target is detached: the loss shapes the current frame, not the previous one.
    """

    def __init__(self, weight: float = 10.0):
        super().__init__()
        self.weight = weight

    def forward(self, fake_cur: Tensor, fake_prev: Tensor, gt_flow: Tensor, conf: Tensor) -> Tensor:
        return self.weight * masked_l1(fake_cur, warp(fake_prev, gt_flow).detach(), conf)


class MaskLoss(nn.Module):
    """Push the occlusion mask to 0 (use the warped image) where the real flow is reliable."""

    def __init__(self, weight: float = 0.0):
        super().__init__()
        self.weight = weight

    def forward(self, mask: Tensor, conf: Tensor) -> Tensor:
        return self.weight * masked_l1(mask, torch.zeros_like(mask), conf)
