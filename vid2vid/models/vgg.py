"""VGG19 feature extractor for the perceptual loss, loadable from torchvision's public weights.

This module has the network and its weights loader only: the loss on top of it is
:class:`vid2vid.models.losses.VGGLoss`, built from a config by :func:`vid2vid.models.objective.build_vgg_loss`.

The module list reproduces torchvision's ``vgg19().features`` index by index, so the public file
``vgg19-dcbb9e9d.pth`` (keys ``features.0.weight`` ... ``features.34.bias`` plus ``classifier.*``)
loads without renaming. Only the layers up to relu5_1 (index 29) are built: the perceptual loss
never looks further, and the three 512x512 convs after it would be 7M dead parameters.

Weights are never random: :func:`load_vgg19` reads a file with ``torch.load(weights_only=True)`` and
checks every key and shape with an error that names it. ``model.vgg_weights`` is that file's path,
``auto`` (torchvision's public file, downloaded once into ``$XDG_CACHE_HOME/vid2vid`` and checked
against the sha256 prefix torchvision publishes in its name: :mod:`vid2vid.weights`) or a
``URL#sha256=`` mirror. The presets meant for real training set ``auto``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from vid2vid.errors import WeightsError

PUBLIC_WEIGHTS = "vgg19-dcbb9e9d.pth"  # torchvision's ImageNet VGG19 file name

# torchvision's VGG19 configuration "E": conv widths, "M" = 2x2 max pool.
_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
           512, 512, 512, 512, "M")
# Exclusive end indices in `features` of relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
SLICE_ENDS = (2, 7, 12, 21, 30)


def _full_feature_shapes() -> dict[str, tuple[int, ...]]:
    """Every conv parameter of torchvision's vgg19 ``features`` (indices 0..34) with its shape."""
    shapes: dict[str, tuple[int, ...]] = {}
    index, c_in = 0, 3
    for item in _LAYOUT:
        if item == "M":
            index += 1
            continue
        shapes[f"features.{index}.weight"] = (item, c_in, 3, 3)
        shapes[f"features.{index}.bias"] = (item,)
        index, c_in = index + 2, item  # conv then ReLU
    return shapes


FEATURE_SHAPES = _full_feature_shapes()
# Keys the truncated network actually uses (convs before relu5_1); the rest may be present or not.
REQUIRED_KEYS = tuple(k for k in FEATURE_SHAPES if int(k.split(".")[1]) < SLICE_ENDS[-1])


def _build_features(end: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for item in _LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(c_in, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            c_in = item
    return nn.Sequential(*layers[:end])


class VGG19(nn.Module):
    """torchvision VGG19 ``features[:30]``; ``forward`` returns relu1_1 ... relu5_1."""

    def __init__(self) -> None:
        super().__init__()
        self.features = _build_features(SLICE_ENDS[-1])

    def forward(self, x: Tensor) -> list[Tensor]:
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"VGG19 expects (N, 3, H, W) images, got shape {tuple(x.shape)}")
        outs: list[Tensor] = []
        start = 0
        for end in SLICE_ENDS:
            for layer in self.features[start:end]:
                x = layer(x)
            outs.append(x)
            start = end
        return outs


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # UnpicklingError for pickled objects, RuntimeError for junk files
        raise WeightsError(
            f"{path}: not a plain tensor state dict loadable with torch.load(weights_only=True) "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path}: expected a state dict (mapping of key -> tensor), "
                           f"got {type(obj).__name__}")
    return obj


def load_vgg19(path: str | Path) -> VGG19:
    """Load torchvision VGG19 weights (e.g. ``vgg19-dcbb9e9d.pth``) into a frozen, eval-mode VGG19.

    ``classifier.*`` keys are ignored; ``features.30`` .. ``features.34`` (after relu5_1) are
    shape-checked but unused. Any other key, a missing key or a wrong shape is an error naming it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG19 weights not found: {path} (torchvision's {PUBLIC_WEIGHTS})")
    state = _read_state_dict(path)
    used: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        if key not in FEATURE_SHAPES:
            raise WeightsError(f"{path}: unexpected key {key!r}; expected torchvision vgg19 keys "
                               f"features.0.weight ... features.34.bias and classifier.*")
        if not isinstance(value, Tensor) or tuple(value.shape) != FEATURE_SHAPES[key]:
            got = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise WeightsError(f"{path}: key {key!r} has shape {got}, expected {FEATURE_SHAPES[key]}")
        if key in REQUIRED_KEYS:
            used[key] = value
    missing = [k for k in REQUIRED_KEYS if k not in used]
    if missing:
        raise WeightsError(f"{path}: missing key(s) {missing}; is this torchvision's {PUBLIC_WEIGHTS}?")
    model = VGG19()
    model.load_state_dict(used, strict=True)
    model.eval()  # no dropout/batch norm in `features`, but make the intent explicit
    for p in model.parameters():
        p.requires_grad_(False)
    return model
