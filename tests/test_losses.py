"""Every loss against a hand computation on tiny tensors."""

from __future__ import annotations

import pytest
import torch

from vid2vid.models.discriminators import DiscriminatorOutput
from vid2vid.models.losses import (
    FeatureMatchingLoss,
    FlowLoss,
    FlowLossTerms,
    GANLoss,
    MaskLoss,
    TemporalWarpLoss,
    masked_l1,
)


def two_scale_output() -> DiscriminatorOutput:
    # scale 0 prediction: [0.5, 2.0, -1.0, 0.0]; scale 1 prediction: [1.5, -0.5]
    p0 = torch.tensor([0.5, 2.0, -1.0, 0.0]).view(1, 1, 2, 2)
    p1 = torch.tensor([1.5, -0.5]).view(1, 1, 1, 2)
    return DiscriminatorOutput([[torch.zeros(1, 2, 2, 2), p0], [torch.zeros(1, 2, 1, 2), p1]])


def test_lsgan_real_and_fake():
    out, loss = two_scale_output(), GANLoss("ls")
    real = ((0.25 + 1.0 + 4.0 + 1.0) / 4) + ((0.25 + 2.25) / 2)
    fake = ((0.25 + 4.0 + 1.0 + 0.0) / 4) + ((2.25 + 0.25) / 2)
    for for_d in (True, False):  # LSGAN: same expression for D and G
        assert loss(out, True, for_d).item() == pytest.approx(real)
        assert loss(out, False, for_d).item() == pytest.approx(fake)


def test_hinge_discriminator_and_generator():
    out, loss = two_scale_output(), GANLoss("hinge")
    # D real: mean(relu(1 - x)); D fake: mean(relu(1 + x))
    d_real = ((0.5 + 0 + 2.0 + 1.0) / 4) + ((0 + 1.5) / 2)
    d_fake = ((1.5 + 3.0 + 0 + 1.0) / 4) + ((2.5 + 0.5) / 2)
    g = -((0.5 + 2.0 - 1.0 + 0.0) / 4) - ((1.5 - 0.5) / 2)
    assert loss(out, True, True).item() == pytest.approx(d_real)
    assert loss(out, False, True).item() == pytest.approx(d_fake)
    assert loss(out, True, False).item() == pytest.approx(g)
    with pytest.raises(ValueError, match="target_is_real=True"):
        loss(out, False, False)


def test_gan_mode_is_honoured_not_ignored():
    out = two_scale_output()
    assert GANLoss("ls")(out, True, True).item() != pytest.approx(GANLoss("hinge")(out, True, True).item())
    with pytest.raises(ValueError, match="gan_mode"):
        GANLoss("vanilla")


def test_feature_matching_per_layer_weights():
    torch.manual_seed(0)
    n_layers, num_D, lam = 2, 2, 10.0
    shapes = [(1, 3, 4, 4), (1, 5, 3, 3), (1, 6, 2, 2), (1, 1, 2, 2)]  # n_layers + 2 features
    fake = DiscriminatorOutput([[torch.randn(s) for s in shapes] for _ in range(num_D)])
    real = DiscriminatorOutput([[torch.randn(s) for s in shapes] for _ in range(num_D)])
    expected = 0.0
    for fs, rs in zip(fake.features, real.features, strict=True):
        for f, r in list(zip(fs, rs, strict=True))[:-1]:  # the prediction map is not matched
            expected += lam * (4 / 3) * (1 / 2) * (f - r).abs().mean().item()
    got = FeatureMatchingLoss(lam, n_layers, num_D)(fake, real)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the real features are detached: no gradient reaches D through the "target"
    real.features[0][0].requires_grad_(True)
    fake.features[0][0].requires_grad_(True)
    FeatureMatchingLoss(lam, n_layers, num_D)(fake, real).backward()
    assert real.features[0][0].grad is None and fake.features[0][0].grad is not None
    short = DiscriminatorOutput([fs[1:] for fs in real.features])
    with pytest.raises(ValueError, match=r"fake \[4, 4\], real \[3, 3\]"):
        FeatureMatchingLoss(lam, n_layers, num_D)(fake, short)


def test_masked_l1_by_hand():
    a = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]).expand(2, 2, 2, 2)
    b = torch.zeros(2, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 0.0], [0.5, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])
    # sample 0, each of 2 channels: 1*1 + 3*0.5 = 2.5; sample 1: 0. Mean over 16 elements.
    assert masked_l1(a, b, mask).item() == pytest.approx(2 * 2.5 / 16)
    assert masked_l1(a, b, None).item() == pytest.approx(2 * 10 / 16)
    with pytest.raises(ValueError, match="mask"):
        masked_l1(a, b, torch.ones(2, 1, 3, 3))


def shift_setup():
    """real_cur is real_prev shifted left by one pixel: warp(real_prev, flow=(1, 0)) == real_cur."""
    torch.manual_seed(0)
    real_prev = torch.randn(1, 3, 6, 8)
    real_cur = torch.roll(real_prev, shifts=-1, dims=-1)
    flow = torch.zeros(1, 2, 6, 8)
    flow[:, 0] = 1.0
    conf = torch.ones(1, 1, 6, 8)
    conf[..., -1] = 0.0  # border column: roll wraps, warp clamps; neither is a real correspondence
    return real_prev, real_cur, flow, conf


def test_flow_loss_endpoint_and_warp_terms():
    real_prev, real_cur, gt_flow, conf = shift_setup()
    loss = FlowLoss(weight=10.0)
    # perfect prediction: both terms vanish (on the confident region)
    terms = loss(gt_flow, gt_flow, real_prev, real_cur, conf)
    assert isinstance(terms, FlowLossTerms)
    assert terms.endpoint.item() == pytest.approx(0.0, abs=1e-6)
    assert terms.warp.item() == pytest.approx(0.0, abs=1e-5)
    # zero prediction: endpoint = 10 * mean over 2x6x8 of |1| * conf (x channel only);
    # warp = 10 * masked L1(prev, cur)
    pred = torch.zeros_like(gt_flow, requires_grad=True)
    terms = loss(pred, gt_flow, real_prev, real_cur, conf)
    assert terms.endpoint.item() == pytest.approx(10.0 * (6 * 7) / (2 * 6 * 8))
    expected_warp = 10.0 * ((real_prev - real_cur).abs() * conf).sum().item() / (3 * 6 * 8)
    assert terms.warp.item() == pytest.approx(expected_warp, rel=1e-5)
    terms.warp.backward()  # the warp term trains the flow
    assert pred.grad is not None and pred.grad.abs().sum() > 0


def test_temporal_warp_loss():
    fake_prev, real_cur, gt_flow, conf = shift_setup()
    fake_prev.requires_grad_(True)
    loss = TemporalWarpLoss(weight=10.0)
    assert loss(real_cur, fake_prev, gt_flow, conf).item() == pytest.approx(0.0, abs=1e-5)
    fake_cur = torch.zeros_like(real_cur, requires_grad=True)
    value = loss(fake_cur, fake_prev, gt_flow, conf)
    expected = 10.0 * (real_cur.abs() * conf).sum().item() / real_cur.numel()
    assert value.item() == pytest.approx(expected, rel=1e-5)
    value.backward()
    assert fake_prev.grad is None  # the warped previous frame is a fixed target
    assert fake_cur.grad is not None


def test_mask_loss():
    mask = torch.tensor([[[[0.2, 0.8], [1.0, 0.0]]]])
    conf = torch.tensor([[[[1.0, 0.0], [0.5, 1.0]]]])
    assert MaskLoss(weight=2.0)(mask, conf).item() == pytest.approx(2.0 * (0.2 + 0.5) / 4)
    assert MaskLoss()(mask, conf).item() == 0.0  # reference default weight: off
