"""Feature encoder E and the vectorised instance-wise average pooling."""

from __future__ import annotations

import pytest
import torch

from vid2vid.config import ModelConfig
from vid2vid.models.encoder import FeatureEncoder, instance_average_pool


def _ids(n=2, h=12, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Cityscapes-like ids: stuff classes (< 1000) and large instance ids (class * 1000 + k); the two
    # images share some ids, which must still be pooled separately per image.
    palette = torch.tensor([0, 7, 11, 26000, 26001, 24003])
    ids = palette[torch.randint(0, len(palette), (n, h, w), generator=g)]
    ids[1, :4] = 33000  # an id only the second image has
    return ids


def _slow_pool(features, ids):
    out = torch.empty_like(features)
    for b in range(features.shape[0]):
        for inst in ids[b].unique():
            sel = ids[b] == inst
            for c in range(features.shape[1]):
                out[b, c][sel] = features[b, c][sel].mean()
    return out


def test_pool_matches_reference_loop_and_is_constant_per_instance():
    feats = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(1))
    ids = _ids()
    pooled = instance_average_pool(feats, ids)
    torch.testing.assert_close(pooled, _slow_pool(feats, ids))
    for b in range(2):
        for inst in ids[b].unique():
            vals = pooled[b][:, ids[b] == inst]
            assert torch.equal(vals, vals[:, :1].expand_as(vals))


def test_pool_gradient_spreads_mean():
    # d/dx of sum(pooled * w) at pixel p = mean of w over p's instance.
    feats = torch.randn(2, 3, 12, 16, generator=torch.Generator().manual_seed(3)).requires_grad_(True)
    ids = _ids(seed=2)
    w = torch.randn(2, 3, 12, 16)
    (instance_average_pool(feats, ids) * w).sum().backward()
    torch.testing.assert_close(feats.grad, _slow_pool(w, ids))


def test_pool_rejects_bad_ids():
    feats = torch.zeros(2, 3, 12, 16)
    with pytest.raises(ValueError, match=r"instance_ids must be \(N,H,W\)"):
        instance_average_pool(feats, _ids(h=11))
    with pytest.raises(ValueError, match="integer"):
        instance_average_pool(feats, _ids().float())


def test_feature_encoder_output():
    cfg = ModelConfig(nef=4, n_downsample_E=2, feat_num=3)
    enc = FeatureEncoder(cfg)
    image = torch.rand(2, 3, 12, 16) * 2 - 1
    ids = _ids()
    out = enc(image, ids)
    assert out.shape == (2, 3, 12, 16)
    assert out.abs().max() <= 1
    torch.testing.assert_close(out, _slow_pool(out, ids))  # already instance-constant
    out.sum().backward()
    assert enc.net[0][1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="multiples of 2\\*\\*n_downsample_E=4"):
        enc(torch.zeros(1, 3, 10, 16), torch.zeros(1, 10, 16, dtype=torch.long))


def test_generator_pools_features_per_class_and_instance():
    """Two stuff classes share the no-instance id 0: each must keep its own pooled feature, in
    training and in every caller of ``encode_features`` (the eval service once pooled by instance only)."""
    from vid2vid.models.vid2vid import GeneratorSide

    cfg = ModelConfig(use_features=True, nef=4, n_downsample_E=2, feat_num=3, ngf=8, n_downsample_G=2, n_blocks=2)
    g = GeneratorSide(cfg)
    frames = torch.rand(1, 2, 3, 12, 16) * 2 - 1
    labels = torch.full((1, 2, 12, 16), 7)  # road ...
    labels[..., 6:, :] = 23  # ... and sky below it, both without instances
    instances = torch.zeros(1, 2, 12, 16, dtype=torch.long)
    feats = g.encode_features(frames, labels, instances)
    assert feats.shape == (1, 2, 3, 12, 16)
    road, sky = feats[0, 0, :, 0, 0], feats[0, 0, :, -1, -1]
    assert not torch.allclose(road, sky)
    torch.testing.assert_close(feats[0, 0, :, :6], road[:, None, None].expand(3, 6, 16))
