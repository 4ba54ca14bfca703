"""warp(): pixel-unit backward warping with align_corners=True semantics and border padding."""

from __future__ import annotations

import pytest
import torch

from vid2vid.models.warp import warp

# (W - 1) and (H - 1) powers of two make the pixel -> [-1, 1] -> pixel round trip exact in binary
# floating point, so "exact" below really means bit-exact.
H, W = 9, 17


def _image(n=2, c=3, h=H, w=W, seed=0):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed))


def _const_flow(n, h, w, dx, dy, dtype=torch.float32):
    flow = torch.zeros(n, 2, h, w, dtype=dtype)
    flow[:, 0], flow[:, 1] = dx, dy
    return flow


def test_zero_flow_is_identity_exactly():
    img = _image()
    assert torch.equal(warp(img, torch.zeros(2, 2, H, W)), img)


def test_zero_flow_is_identity_at_any_size():
    # The reference's align_corners mismatch shifted every pixel by half a pixel (errors ~0.5 * |grad|);
    # what remains here is float32 rounding of the normalised grid.
    img = _image(h=10, w=13)
    torch.testing.assert_close(warp(img, torch.zeros(2, 2, 10, 13)), img, atol=1e-5, rtol=0)


def test_integer_translation_is_exact_shift():
    img = _image()
    out = warp(img, _const_flow(2, H, W, dx=2.0, dy=-1.0))
    # out(y, x) = img(y - 1, x + 2) wherever that source pixel exists.
    assert torch.equal(out[..., 1:, : W - 2], img[..., :-1, 2:])


def test_border_padding_repeats_edge_pixels():
    img = _image()
    right = warp(img, _const_flow(2, H, W, dx=100.0, dy=0.0))
    assert torch.equal(right, img[..., -1:].expand_as(img))
    up_left = warp(img, _const_flow(2, H, W, dx=-100.0, dy=-100.0))
    assert torch.equal(up_left, img[..., :1, :1].expand_as(img))


def test_fractional_flow_matches_hand_bilinear():
    img = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    out = warp(img, _const_flow(1, 2, 2, dx=0.25, dy=0.5))
    # (0,0) samples (x=0.25, y=0.5): 0.5*(0.75*1 + 0.25*2) + 0.5*(0.75*3 + 0.25*4) = 2.25
    # (x=1,y=0) samples (1.25, 0.5) -> x clamped to 1: 0.5*2 + 0.5*4 = 3
    # (x=0,y=1) samples (0.25, 1.5) -> y clamped to 1: 0.75*3 + 0.25*4 = 3.25
    # (1,1) -> 4
    expected = torch.tensor([[[[2.25, 3.0], [3.25, 4.0]]]])
    assert torch.equal(out, expected)


def test_gradients_reach_image_and_flow():
    img = _image().requires_grad_(True)
    flow = (torch.rand(2, 2, H, W, generator=torch.Generator().manual_seed(1)) * 3 - 1.5)
    flow.requires_grad_(True)
    weights = torch.randn(2, 3, H, W, generator=torch.Generator().manual_seed(2))
    (warp(img, flow) * weights).sum().backward()
    for g in (img.grad, flow.grad):
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    img = torch.randn(1, 2, 5, 5, dtype=torch.float64, generator=g).requires_grad_(True)
    # Keep sample points away from integer positions, where bilinear interpolation has kinks.
    flow = (0.3 + 0.4 * torch.rand(1, 2, 5, 5, dtype=torch.float64, generator=g)).requires_grad_(True)
    assert torch.autograd.gradcheck(warp, (img, flow))


def test_low_precision_inputs_sampled_in_float32_and_cast_back():
    img = _image()
    flow = _const_flow(2, H, W, dx=0.37, dy=-0.61)
    ref = warp(img, flow)
    out = warp(img.bfloat16(), flow.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), warp(img.bfloat16().float(), flow.bfloat16().float()),
                               atol=0.02, rtol=0.02)
    assert (out.float() - ref).abs().max() < 0.1


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"flow must be \(N,2,H,W\)"):
        warp(_image(), torch.zeros(2, 2, H, W + 1))
