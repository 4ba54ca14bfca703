"""VGG19 loading from torchvision's state-dict format, and the VGG perceptual loss."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vid2vid.config import ModelConfig
from vid2vid.models.losses import VGG_LAYER_WEIGHTS, VGGLoss, downsample_for_vgg
from vid2vid.models.objective import build_vgg_loss
from vid2vid.models.vgg import VGG19, load_vgg19

# torchvision vgg19 `features`: conv indices and output widths (independent of the module's table).
TV_CONVS = {0: 64, 2: 64, 5: 128, 7: 128, 10: 256, 12: 256, 14: 256, 16: 256,
            19: 512, 21: 512, 23: 512, 25: 512, 28: 512, 30: 512, 32: 512, 34: 512}


def torchvision_state_dict() -> dict[str, torch.Tensor]:
    """Random weights laid out as torchvision's vgg19-dcbb9e9d.pth (classifier shrunk: it is ignored)."""
    g = torch.Generator().manual_seed(0)
    sd, c_in = {}, 3
    for idx, c_out in TV_CONVS.items():
        sd[f"features.{idx}.weight"] = torch.randn(c_out, c_in, 3, 3, generator=g) * (2 / (9 * c_in)) ** 0.5
        sd[f"features.{idx}.bias"] = torch.randn(c_out, generator=g) * 0.01
        c_in = c_out
    for i in (0, 3, 6):
        sd[f"classifier.{i}.weight"] = torch.randn(4, 4, generator=g)
        sd[f"classifier.{i}.bias"] = torch.randn(4, generator=g)
    return sd


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return torchvision_state_dict()


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory, state) -> Path:
    path = tmp_path_factory.mktemp("vgg") / "vgg19-dcbb9e9d.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def vgg(weights_file) -> VGG19:
    return load_vgg19(weights_file)


def test_round_trip_and_slices(vgg, state):
    for key, value in vgg.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    assert "features.30.weight" not in vgg.state_dict()  # nothing after relu5_1 is built
    assert not vgg.training and not any(p.requires_grad for p in vgg.parameters())
    x = torch.randn(1, 3, 32, 32)
    outs = vgg(x)
    assert [tuple(o.shape) for o in outs] == [(1, 64, 32, 32), (1, 128, 16, 16), (1, 256, 8, 8),
                                              (1, 512, 4, 4), (1, 512, 2, 2)]
    # relu1_1 by hand: conv0 then ReLU
    torch.testing.assert_close(outs[0], F.relu(F.conv2d(x, state["features.0.weight"],
                                                        state["features.0.bias"], padding=1)))


def test_renamed_key_is_named(tmp_path, state):
    bad = dict(state)
    bad["features.1.weight"] = bad.pop("features.2.weight")
    path = tmp_path / "renamed.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"features\.1\.weight"):
        load_vgg19(path)
    missing = {k: v for k, v in state.items() if k != "features.28.bias"}
    torch.save(missing, path)
    with pytest.raises(ValueError, match=r"missing.*features\.28\.bias"):
        load_vgg19(path)


def test_wrong_shape_is_named(tmp_path, state):
    bad = dict(state)
    bad["features.5.weight"] = torch.zeros(128, 32, 3, 3)
    path = tmp_path / "shape.pth"
    torch.save(bad, path)
    with pytest.raises(ValueError, match=r"features\.5\.weight.*\(128, 32, 3, 3\).*\(128, 64, 3, 3\)"):
        load_vgg19(path)


class NotATensor:
    pass


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"features.0.weight": NotATensor()}, path)
    with pytest.raises(ValueError, match=r"evil\.pth.*weights_only"):
        load_vgg19(path)


def test_missing_file_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_vgg19(tmp_path / "nope.pth")


def test_build_vgg_loss_without_weights_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert build_vgg_loss(ModelConfig(vgg_weights=None)) is None
    assert "model.vgg_weights" in caplog.text and "vgg19-dcbb9e9d.pth" in caplog.text


def test_build_vgg_loss_with_weights(weights_file):
    loss = build_vgg_loss(ModelConfig(vgg_weights=str(weights_file), lambda_vgg=3.0))
    assert isinstance(loss, VGGLoss) and loss.weight == 3.0


def test_auto_weights_fetched_once_and_a_failed_download_says_why(weights_file, tmp_path, monkeypatch, caplog):
    """model.vgg_weights=auto (the real presets' setting): torchvision's file from a (here: file://) URL,
    checked against the sha256 prefix in its name, cached; without a network the loss is off and says why."""
    import dataclasses
    import hashlib

    from vid2vid import weights

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    prefix = hashlib.sha256(weights_file.read_bytes()).hexdigest()[:8]
    monkeypatch.setitem(weights.PUBLIC, "vgg19", dataclasses.replace(weights.PUBLIC["vgg19"], url=weights_file.as_uri(),
                                                                     sha256_prefix=prefix))
    loss = build_vgg_loss(ModelConfig(vgg_weights="auto"))
    assert isinstance(loss, VGGLoss) and (tmp_path / "xdg" / "vid2vid" / "vgg19-dcbb9e9d.pth").is_file()
    (tmp_path / "xdg" / "vid2vid" / "vgg19-dcbb9e9d.pth").unlink()
    monkeypatch.setitem(weights.PUBLIC, "vgg19", dataclasses.replace(weights.PUBLIC["vgg19"],
                                                                     url=(tmp_path / "down").as_uri()))
    with caplog.at_level(logging.WARNING):
        assert build_vgg_loss(ModelConfig(vgg_weights="auto")) is None
    assert "VGG perceptual loss is OFF: vgg19-dcbb9e9d.pth: cannot download" in caplog.text


def test_vgg_loss_zero_for_identical_and_by_hand(vgg):
    torch.manual_seed(0)
    loss = VGGLoss(vgg, weight=10.0)
    a, b = torch.rand(1, 3, 32, 32) * 2 - 1, torch.rand(1, 3, 32, 32) * 2 - 1
    assert loss(a, a).item() == 0.0
    assert not loss.train().vgg.training  # the frozen VGG stays in eval mode
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    fa, fb = vgg(((a + 1) / 2 - mean) / std), vgg(((b + 1) / 2 - mean) / std)
    expected = 10.0 * sum(w * (x - y).abs().mean() for w, x, y in zip(VGG_LAYER_WEIGHTS, fa, fb, strict=True))
    torch.testing.assert_close(loss(a, b), expected)


def test_downsampling_rule():
    shape = lambda w: tuple(downsample_for_vgg(torch.zeros(1, 3, 8, w)).shape[-2:])  # noqa: E731
    assert shape(1024) == (8, 1024)  # not wider than 1024: untouched
    assert shape(2048) == (4, 1024)
    assert shape(1026) == (4, 513)
    assert shape(4100) == (1, 512)  # 4100 -> 2050 -> 1025 -> 512
    x = torch.arange(8.0).view(1, 1, 2, 4).repeat(1, 3, 1, 300)  # width 1200
    torch.testing.assert_close(downsample_for_vgg(x), F.avg_pool2d(x, 2))


def test_vgg_loss_applies_downsampling(vgg):
    torch.manual_seed(1)
    loss = VGGLoss(vgg, weight=1.0)
    a, b = torch.rand(1, 3, 32, 1040) * 2 - 1, torch.rand(1, 3, 32, 1040) * 2 - 1
    torch.testing.assert_close(loss(a, b), loss(F.avg_pool2d(a, 2), F.avg_pool2d(b, 2)))
