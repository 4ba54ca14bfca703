"""D_I / D_V shapes, channel counts, scale pyramid and input validation (tiny shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

from vid2vid.config import ModelConfig
from vid2vid.models.discriminators import (
    DiscriminatorOutput,
    ImageDiscriminator,
    MultiscaleDiscriminator,
    VideoDiscriminator,
)


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(label_nc=4, use_instance=True, ndf=8, n_layers_D=3, num_D=2, n_frames_D=3,
                n_scales_temporal=2, fg_labels=[1])
    base.update(kw)
    return ModelConfig(**base)


def expected_sizes(size: int, n_layers: int) -> list[int]:
    """Spatial size after each layer: 4x4 conv, pad 2 -> floor((s + 4 - 4) / stride) + 1."""
    out = []
    for i in range(n_layers + 2):
        stride = 2 if i < n_layers else 1
        size = size // stride + 1
        out.append(size)
    return out


def expected_channels(ndf: int, n_layers: int) -> list[int]:
    ch = [ndf]
    for _ in range(n_layers):
        ch.append(min(ch[-1] * 2, 512))
    return ch + [1]


def test_image_discriminator_shapes_and_features():
    cfg = tiny_cfg()
    d = ImageDiscriminator(cfg)
    assert cfg.label_channels == 5
    assert d.net.input_nc == 5 + 3
    out = d(torch.randn(2, 5, 32, 32), torch.randn(2, 3, 32, 32))
    assert isinstance(out, DiscriminatorOutput)
    assert len(out.features) == cfg.num_D
    for s, (feats, size) in enumerate(zip(out.features, (32, 16), strict=True)):
        assert len(feats) == cfg.n_layers_D + 2
        sizes = expected_sizes(size, cfg.n_layers_D)
        chans = expected_channels(cfg.ndf, cfg.n_layers_D)
        assert [tuple(f.shape) for f in feats] == [(2, c, k, k) for c, k in zip(chans, sizes, strict=True)], s
        assert out.predictions[s] is feats[-1]


def test_channel_cap_at_512():
    d = MultiscaleDiscriminator(3, ndf=256, n_layers=3, num_D=1, norm="none", spectral_norm=False)
    out = d(torch.randn(1, 3, 16, 16))
    assert [f.shape[1] for f in out.features[0]] == [256, 512, 512, 512, 1]


def test_multiscale_uses_avgpool_without_padding_counted():
    torch.manual_seed(0)
    d = MultiscaleDiscriminator(3, ndf=8, n_layers=2, num_D=3, norm="none", spectral_norm=False)
    x = torch.randn(1, 3, 32, 32) + 3.0  # an offset makes zero-padding-counted averages differ
    out = d(x)
    x1 = F.avg_pool2d(x, 3, 2, 1, count_include_pad=False)
    x2 = F.avg_pool2d(x1, 3, 2, 1, count_include_pad=False)
    torch.testing.assert_close(out.features[1][-1], d.scales[1](x1)[-1])
    torch.testing.assert_close(out.features[2][-1], d.scales[2](x2)[-1])
    wrong = F.avg_pool2d(x, 3, 2, 1, count_include_pad=True)
    assert not torch.allclose(out.features[1][-1], d.scales[1](wrong)[-1])


def test_no_norm_on_first_layer_and_norm_options():
    d = MultiscaleDiscriminator(3, 8, 3, 1, norm="instance", spectral_norm=False)
    blocks = d.scales[0].blocks
    assert not any(isinstance(m, (torch.nn.InstanceNorm2d, torch.nn.BatchNorm2d)) for m in blocks[0])
    assert all(isinstance(b[1], torch.nn.InstanceNorm2d) for b in blocks[1:-1])
    d = MultiscaleDiscriminator(3, 8, 3, 1, norm="batch", spectral_norm=False)
    assert all(isinstance(b[1], torch.nn.BatchNorm2d) for b in d.scales[0].blocks[1:-1])
    with pytest.raises(ValueError, match="norm"):
        MultiscaleDiscriminator(3, 8, 3, 1, norm="group", spectral_norm=False)


def test_spectral_norm_option():
    convs = lambda d: [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]  # noqa: E731
    with_sn = ImageDiscriminator(tiny_cfg(spectral_norm=True))
    without = ImageDiscriminator(tiny_cfg(spectral_norm=False))
    assert convs(with_sn) and all(parametrize.is_parametrized(c, "weight") for c in convs(with_sn))
    assert not any(parametrize.is_parametrized(c, "weight") for c in convs(without))
    out = with_sn(torch.randn(1, 5, 32, 32), torch.randn(1, 3, 32, 32))
    assert out.predictions[0].shape[1] == 1


def test_image_discriminator_rejects_mismatched_source():
    d = ImageDiscriminator(tiny_cfg())
    with pytest.raises(ValueError, match=r"\(2, 5, 32, 32\)"):
        d(torch.randn(2, 4, 32, 32), torch.randn(2, 3, 32, 32))


def test_video_discriminator_channels_and_shapes():
    cfg = tiny_cfg(n_frames_D=3, n_scales_temporal=2)
    d = VideoDiscriminator(cfg)
    assert len(d.temporal) == 2
    assert d.input_nc == 3 * 3 + 2 * 2 == 13
    assert d.temporal[0].scales[0].blocks[0][0].in_channels == 13
    assert [d.frame_step(s) for s in range(3)] == [1, 3, 9]
    frames, flows = torch.randn(2, 3, 3, 32, 32), torch.randn(2, 2, 2, 32, 32)
    for scale in range(2):
        out = d(frames, flows, scale)
        assert len(out.features) == cfg.num_D
        assert all(len(f) == cfg.n_layers_D + 2 for f in out.features)
        assert out.predictions[0].shape == (2, 1, 7, 7)
    assert VideoDiscriminator(tiny_cfg(n_frames_D=4)).input_nc == 12 + 6


def test_video_discriminator_input_layout():
    """Frames in order then flows / flow_multiplier, along channels."""
    cfg = tiny_cfg(n_frames_D=2, n_scales_temporal=1, num_D=1)
    d = VideoDiscriminator(cfg)
    frames, flows = torch.randn(1, 2, 3, 16, 16), 20 * torch.randn(1, 1, 2, 16, 16)
    seen = {}
    d.temporal[0].scales[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    d(frames, flows, 0)
    expect = torch.cat([frames[:, 0], frames[:, 1], flows[:, 0] / cfg.flow_multiplier], dim=1)
    torch.testing.assert_close(seen["x"], expect)


def test_video_discriminator_rejects_wrong_counts():
    d = VideoDiscriminator(tiny_cfg(n_frames_D=3))
    with pytest.raises(ValueError, match=r"expected \(N, 3, 3, H, W\).*\(2, 2, 3, 32, 32\)"):
        d(torch.randn(2, 2, 3, 32, 32), torch.randn(2, 2, 2, 32, 32), 0)
    with pytest.raises(ValueError, match=r"expected \(2, 2, 2, 32, 32\).*\(2, 3, 2, 32, 32\)"):
        d(torch.randn(2, 3, 3, 32, 32), torch.randn(2, 3, 2, 32, 32), 0)
    with pytest.raises(ValueError, match="scale 2 out of range"):
        d(torch.randn(2, 3, 3, 32, 32), torch.randn(2, 2, 2, 32, 32), 2)
