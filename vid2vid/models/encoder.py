"""Feature encoder E for multimodal synthesis (paper §3, "multimodal synthesis").

E maps a real frame to a low-dimensional feature map; instance-wise average pooling then gives every
pixel of an object the same feature vector, so at test time one sampled vector per instance restyles
the object.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.models.blocks import down, head, init_weights, stem, up

OBJECT_KEY = 1 << 16  # instance ids stay below 2**16 (Cityscapes' 16-bit ids included)


def object_ids(labels: Tensor, instances: Tensor) -> Tensor:
    """One id per object: (class, instance) -> class * 2**16 + instance.

    Pooling by instance id alone would merge every "stuff" class (road, building, sky), which all
    share the no-instance id, into one feature vector; keyed by class too, each keeps its own.
    """
    return labels.long() * OBJECT_KEY + instances.long()


def instance_average_pool(features: Tensor, instance_ids: Tensor) -> Tensor:
    """Replace every pixel's feature by the mean over its instance (per image), differentiably.

    features (N, C, H, W); instance_ids (N, H, W) integer. One ``index_add_`` over flattened
    (image, instance) keys instead of the reference's Python loop over instances and channels.
    """
    if features.dim() != 4:
        raise ValueError(f"instance_average_pool: features must be (N,C,H,W), got {tuple(features.shape)}")
    n, c, h, w = features.shape
    if instance_ids.shape != (n, h, w):
        raise ValueError(
            f"instance_average_pool: instance_ids must be (N,H,W) = {(n, h, w)}, "
            f"got {tuple(instance_ids.shape)}"
        )
    if instance_ids.dtype.is_floating_point or instance_ids.dtype == torch.bool:
        raise ValueError(f"instance_average_pool: instance_ids must be integer, got {instance_ids.dtype}")
    # Compact the (possibly large, e.g. Cityscapes 26001) ids to 0..K-1, then key = image * K + id so
    # instances of different images never share a bucket.
    _, compact = torch.unique(instance_ids.reshape(n, -1), return_inverse=True)
    k = int(compact.max()) + 1
    keys = (compact + torch.arange(n, device=compact.device).unsqueeze(1) * k).reshape(-1)
    flat = features.permute(0, 2, 3, 1).reshape(-1, c)
    sums = flat.new_zeros(n * k, c).index_add_(0, keys, flat)
    counts = torch.bincount(keys, minlength=n * k).clamp_min(1).to(flat.dtype)
    means = sums / counts.unsqueeze(1)
    return means[keys].reshape(n, h, w, c).permute(0, 3, 1, 2)


class FeatureEncoder(nn.Module):
    """conv7 -> n_downsample_E downs -> as many ups -> conv7 -> feat_num, tanh -> instance pooling."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        nef, n = cfg.nef, cfg.n_downsample_E
        self.n_down = n
        layers: list[nn.Module] = [stem(cfg.output_nc, nef, cfg.norm)]
        layers += [down(nef * 2**i, nef * 2 ** (i + 1), cfg.norm) for i in range(n)]
        layers += [up(nef * 2**i, nef * 2 ** (i - 1), cfg.norm) for i in range(n, 0, -1)]
        layers.append(head(nef, cfg.feat_num, nn.Tanh()))
        self.net = nn.Sequential(*layers)
        init_weights(self)

    def forward(self, image: Tensor, instance_ids: Tensor) -> Tensor:
        """image (N, 3, H, W) in [-1, 1]; instance_ids (N, H, W) -> (N, feat_num, H, W)."""
        m = 2**self.n_down
        if image.dim() != 4 or image.shape[-1] % m or image.shape[-2] % m:
            raise ValueError(
                f"FeatureEncoder: image must be (N,C,H,W) with H, W multiples of 2**n_downsample_E={m}, "
                f"got {tuple(image.shape)}"
            )
        return instance_average_pool(self.net(image), instance_ids)
