"""Vid2VidGenerator: eq. 4 composition, fg/bg prior, ablations, scales, and the input plumbing."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vid2vid.config import ModelConfig
from vid2vid.models.generator import Vid2VidGenerator
from vid2vid.models.inputs import downsample_pyramid, encode_source, foreground_mask, one_hot_labels
from vid2vid.models.warp import warp

N, H, W = 2, 32, 64
CAR = 26


def tiny(**kw) -> ModelConfig:
    base = dict(ngf=8, n_blocks=2, n_downsample_G=2, n_blocks_local=1, n_scales_spatial=1)
    base.update(kw)
    return ModelConfig(**base)


def make_inputs(cfg: ModelConfig, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 20, (N, cfg.n_frames_G, H, W), generator=g)  # 0..19: background classes
    ids[:, :, 8:20, 10:30] = CAR  # a car in every frame
    edges = (torch.rand(N, cfg.n_frames_G, H, W, generator=g) > 0.9).float()
    source = encode_source(ids, edges, cfg)
    prev = torch.rand(N, cfg.prev_frames, 3, H, W, generator=g) * 2 - 1
    return source, prev, ids[:, -1]


def randomise_flow_heads(gen: Vid2VidGenerator) -> None:
    """The flow heads start at zero; give them weights so that flows and warps are non-trivial."""
    torch.manual_seed(0)
    for scale in gen.scales:
        nn.init.normal_(scale.flow_head[-1].weight, 0.0, 0.02)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _force(value: float):
    def hook(_module, _inputs, output):
        return torch.full_like(output, value)
    return hook


# --- eq. 4 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_value, field", [(0.0, "warped"), (1.0, "hallucinated")])
def test_eq4_mask_selects_warped_or_hallucinated(mask_value, field):
    cfg = tiny(fg_bg_prior=False)
    gen = Vid2VidGenerator(cfg)
    randomise_flow_heads(gen)
    source, prev, _ = make_inputs(cfg)
    gen.scales[-1].mask_head.register_forward_hook(_force(mask_value))
    out = gen(source, prev)
    assert not torch.allclose(out.warped, out.hallucinated)  # the check below is not vacuous
    assert torch.equal(out.frame, getattr(out, field))


def test_eq4_soft_mask_blend_and_warp_of_last_previous_frame():
    cfg = tiny(fg_bg_prior=False)
    gen = Vid2VidGenerator(cfg)
    randomise_flow_heads(gen)
    source, prev, _ = make_inputs(cfg)
    out = gen(source, prev)
    assert out.flow.abs().max() > 0.5  # real displacement, not ~identity
    torch.testing.assert_close(out.warped, warp(prev[:, -1], out.flow))
    torch.testing.assert_close(out.frame, (1 - out.mask) * out.warped + out.mask * out.hallucinated)
    assert 0 <= out.mask.min() and out.mask.max() <= 1
    assert out.frame.abs().max() <= 1


def test_flow_head_starts_at_zero_flow():
    cfg = tiny(fg_bg_prior=False)
    source, prev, _ = make_inputs(cfg)
    out = Vid2VidGenerator(cfg)(source, prev)
    assert torch.equal(out.flow, torch.zeros_like(out.flow))


# --- fg/bg prior -----------------------------------------------------------------------------------


def test_foreground_pixels_equal_foreground_branch():
    cfg = tiny(n_scales_spatial=2)
    gen = Vid2VidGenerator(cfg)
    randomise_flow_heads(gen)
    source, prev, ids = make_inputs(cfg)
    out = gen(source, prev, label_ids=ids)
    fg = out.fg_mask.bool().expand_as(out.frame)
    assert torch.equal(out.fg_mask, torch.isin(ids, torch.tensor(cfg.fg_labels)).unsqueeze(1).float())
    assert fg.any() and (~fg).any()
    assert torch.equal(out.frame[fg], out.foreground[fg])
    assert torch.equal(out.hallucinated[fg], out.foreground[fg])
    # Background pixels follow eq. 4 with the background hallucination h_B.
    blend = (1 - out.mask) * out.warped + out.mask * out.hallucinated
    torch.testing.assert_close(out.frame[~fg], blend[~fg])
    assert not torch.allclose(out.frame[~fg], out.foreground[~fg])


def test_fg_prior_requires_current_label_ids():
    cfg = tiny()
    source, prev, _ = make_inputs(cfg)
    with pytest.raises(ValueError, match="label_ids"):
        Vid2VidGenerator(cfg)(source, prev)


# --- ablation switches -----------------------------------------------------------------------------


def _names(gen: nn.Module) -> set[str]:
    return {name for name, _ in gen.named_parameters()}


def test_no_flow_warping_builds_no_flow_or_mask_parameters():
    full, ablated = Vid2VidGenerator(tiny()), Vid2VidGenerator(tiny(flow_warping=False))
    flow_names = {n for n in _names(full) if ".flow_" in n or ".mask_head." in n}
    assert flow_names and not {n for n in _names(ablated) if ".flow_" in n or ".mask_head." in n}
    assert _names(full) - _names(ablated) == flow_names
    flow_count = sum(p.numel() for n, p in full.named_parameters() if n in flow_names)
    assert n_params(full) - n_params(ablated) == flow_count
    source, prev, ids = make_inputs(tiny())
    out = ablated(source, prev, label_ids=ids)
    assert out.flow is None and out.mask is None and out.warped is None
    assert torch.equal(out.frame, out.hallucinated)


def test_no_fg_prior_builds_no_foreground_branch():
    full, ablated = Vid2VidGenerator(tiny()), Vid2VidGenerator(tiny(fg_bg_prior=False))
    fg_names = {n for n in _names(full) if ".fg_" in n}
    assert fg_names and not {n for n in _names(ablated) if ".fg_" in n}
    assert _names(full) - _names(ablated) == fg_names
    assert n_params(full) > n_params(ablated)
    source, prev, _ = make_inputs(tiny())
    out = ablated(source, prev)
    assert out.foreground is None and out.fg_mask is None


def test_fg_branch_width_halves_when_deep():
    # ngf // 2 when n_downsample_G > 2 (as the reference), else ngf.
    assert Vid2VidGenerator(tiny(n_downsample_G=3)).scales[0].fg_enc[0][1].out_channels == 4
    assert Vid2VidGenerator(tiny(n_downsample_G=2)).scales[0].fg_enc[0][1].out_channels == 8


# --- no previous frame -----------------------------------------------------------------------------


def test_no_previous_frame_path_hallucinates_and_skips_prev_encoder():
    cfg = tiny(n_scales_spatial=2)
    gen = Vid2VidGenerator(cfg)
    source, _, ids = make_inputs(cfg)
    out = gen(source, None, label_ids=ids)
    assert out.flow is None and out.mask is None and out.warped is None
    fg = out.fg_mask.bool().expand_as(out.frame)
    assert torch.equal(out.frame, out.hallucinated)
    assert torch.equal(out.frame[fg], out.foreground[fg])
    out.frame.sum().backward()
    for scale in gen.scales:
        assert all(p.grad is None for p in scale.prev_enc.parameters())
        assert all(p.grad is None for p in scale.flow_branch.parameters())
    assert gen.scales[-1].label_enc[0][1].weight.grad.abs().sum() > 0


# --- scales ----------------------------------------------------------------------------------------


def test_three_scale_shapes_widths_and_coarse_features_used():
    cfg = tiny(n_scales_spatial=3)
    gen = Vid2VidGenerator(cfg)
    randomise_flow_heads(gen)
    assert [s.label_enc[0][1].out_channels for s in gen.scales] == [8, 4, 2]
    source, prev, ids = make_inputs(cfg)
    out = gen(source, prev, label_ids=ids)
    assert out.frame.shape == out.hallucinated.shape == out.warped.shape == (N, 3, H, W)
    assert out.flow.shape == (N, 2, H, W) and out.mask.shape == out.fg_mask.shape == (N, 1, H, W)
    # Every coarse branch feeds the finest output (their features are added at the bottleneck).
    (out.frame.sum() + out.flow.sum()).backward()
    for scale in gen.scales[:-1]:
        branches = (scale.label_enc, scale.prev_enc, scale.image_branch, scale.flow_branch, scale.fg_branch)
        for branch in branches:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())


@pytest.mark.parametrize("n_scales", [1, 2, 3])
def test_flow_multiplier_per_scale(n_scales):
    cfg = tiny(n_scales_spatial=n_scales, fg_bg_prior=False, flow_multiplier=20.0)
    gen = Vid2VidGenerator(cfg)
    assert [s.flow_scale for s in gen.scales] == [20.0 * 2**s for s in range(n_scales)]
    randomise_flow_heads(gen)
    raw = {}
    gen.scales[-1].flow_head.register_forward_hook(lambda m, i, o: raw.setdefault("flow", o))
    source, prev, _ = make_inputs(cfg)
    out = gen(source, prev)
    assert raw["flow"].abs().max() > 0
    torch.testing.assert_close(out.flow, raw["flow"] * 20.0 * 2 ** (n_scales - 1))


def test_freeze_coarse_scales():
    gen = Vid2VidGenerator(tiny(n_scales_spatial=3))
    gen.freeze_coarse_scales(True)
    assert not any(p.requires_grad for s in gen.scales[:-1] for p in s.parameters())
    assert all(p.requires_grad for p in gen.scales[-1].parameters())
    gen.freeze_coarse_scales(False)
    assert all(p.requires_grad for p in gen.parameters())


def test_size_not_multiple_raises_with_sizes():
    cfg = tiny(n_scales_spatial=2)  # needs multiples of 2**(2 + 1) = 8
    source, prev, ids = make_inputs(cfg)
    with pytest.raises(ValueError, match=r"60x32 .* multiple of 8"):
        Vid2VidGenerator(cfg)(source[..., :60], prev[..., :60], label_ids=ids[..., :60])


# --- features (multimodal) -------------------------------------------------------------------------


def test_features_are_concatenated_per_frame():
    cfg = tiny(use_features=True, feat_num=3)
    gen = Vid2VidGenerator(cfg)
    assert gen.scales[0].label_enc[0][1].in_channels == cfg.n_frames_G * (cfg.label_channels + 3)
    source, prev, ids = make_inputs(cfg)
    feats = torch.rand(N, cfg.n_frames_G, 3, H, W) * 2 - 1
    a = gen(source, prev, label_ids=ids, features=feats).frame
    b = gen(source, prev, label_ids=ids, features=-feats).frame
    assert not torch.allclose(a, b)
    with pytest.raises(ValueError, match="use_features"):
        gen(source, prev, label_ids=ids)


# --- inputs.py -------------------------------------------------------------------------------------


def test_one_hot_and_bad_ids():
    ids = torch.tensor([[[0, 2], [1, 2]]])
    oh = one_hot_labels(ids, 3)
    assert oh.shape == (1, 3, 2, 2) and oh.dtype == torch.float32
    assert torch.equal(oh.argmax(1), ids) and torch.equal(oh.sum(1), torch.ones(1, 2, 2))
    with pytest.raises(ValueError, match="label id 7 >= label_nc=3"):
        one_hot_labels(torch.tensor([[0, 7], [1, 2]]), 3)


def test_encode_source_channels_and_dense_input():
    cfg = tiny()
    ids = torch.randint(0, 35, (1, 3, 4, 8))
    edges = torch.zeros(1, 3, 4, 8)
    edges[..., 0, 0] = 1
    src = encode_source(ids, edges, cfg)
    assert src.shape == (1, 3, cfg.label_channels, 4, 8)
    assert torch.equal(src[:, :, :35].argmax(2), ids) and torch.equal(src[:, :, 35], edges)
    with pytest.raises(ValueError, match="instance_edges"):
        encode_source(ids, None, cfg)
    dense = ModelConfig(label_nc=0, input_nc=6, use_instance=False, fg_bg_prior=False)
    pose = torch.rand(1, 3, 6, 4, 8)
    assert torch.equal(encode_source(pose, None, dense), pose)


def test_foreground_mask_values():
    ids = torch.tensor([[[26, 7], [24, 33]]])
    assert torch.equal(foreground_mask(ids, [24, 26]), torch.tensor([[[[1.0, 0.0], [1.0, 0.0]]]]))


def test_downsample_pyramid_excludes_padding():
    x = torch.full((1, 2, 3, 8, 16), 0.5)  # (N,T,C,H,W)
    levels = downsample_pyramid(x, 3)
    assert [tuple(t.shape) for t in levels] == [(1, 2, 3, 8, 16), (1, 2, 3, 4, 8), (1, 2, 3, 2, 4)]
    # count_include_pad=False: a constant image stays constant, borders included.
    assert all(torch.allclose(t, torch.full_like(t, 0.5)) for t in levels)
    img = torch.arange(16.0).view(1, 1, 4, 4)
    # Top-left output averages the 2x2 in-image pixels of its 3x3 window: (0 + 1 + 4 + 5) / 4.
    assert downsample_pyramid(img, 2)[1][0, 0, 0, 0] == 2.5
