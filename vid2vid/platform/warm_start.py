"""Loading trained weights by name: warm starts from a lower-resolution run, and model files for
evaluation and generation.

Every checkpoint holds, besides the DeepSpeed state, ``<side>/weights.pt`` (a plain state dict of the
generator or discriminator side) and ``config.json`` (the run's resolved config), so a checkpoint is
usable without DeepSpeed and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from vid2vid.errors import CheckpointError, WeightsError

WEIGHTS = "weights.pt"
CONFIG = "config.json"


def weights_path(checkpoint_dir: str | Path, side: str) -> Path:
    path = Path(checkpoint_dir) / side / WEIGHTS
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {side}/{WEIGHTS}; is it a vid2vid training checkpoint?")
    return path


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict, or a :class:`WeightsError` naming the file (a truncated or overwritten file
    otherwise fails deep inside torch with e.g. ``KeyError: 174812789``)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read it is the file's
        raise WeightsError(f"{path}: cannot read the weights ({type(err).__name__}: {str(err)[:200]}); the file is "
                           f"damaged or not a torch state dict") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


def save_weights(checkpoint_dir: str | Path, side: str, module: nn.Module) -> Path:
    path = Path(checkpoint_dir) / side / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


@dataclass
class Matched:
    """What a warm start took from a checkpoint, by tensor name."""

    copied: list[str]  # same name and shape: loaded
    new: list[str]  # in the module only (a finer scale, an extra discriminator scale): kept as initialised
    reshaped: list[str]  # in both with different shapes: kept as initialised
    unused: list[str]  # in the checkpoint only

    def new_modules(self) -> list[str]:
        """The new tensors grouped by the module that owns them: ``generator.scales.1`` for a new spatial
        scale, ``image.net.scales.2`` for a new discriminator scale."""
        return sorted({_owner(name) for name in self.new + self.reshaped})


def _owner(name: str) -> str:
    scale = re.match(r"(.*?scales\.\d+)\.", name)
    return scale.group(1) if scale else name.rsplit(".", 1)[0]


def load_matching(module: nn.Module, checkpoint_dir: str | Path, side: str) -> Matched:
    """Copy every tensor whose name and shape match into ``module``.

    A 1024 run warm-started from a 512 run: the 512 model's global generator becomes ``scales.0`` of
    the new one (both runs name their coarsest scale ``scales.0``), the local enhancer is new.
    Discriminators whose shapes changed (more scales) keep their fresh initialisation for those layers.
    Load before a DeepSpeed engine wraps the module: ZeRO-1/2 copy the weights at ``initialize`` and
    write that copy back after every step. A checkpoint sharing no tensor with the module is an error.
    """
    path = weights_path(checkpoint_dir, side)
    saved = read_weights(path)
    own = module.state_dict()
    matching = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    if not matching:
        raise ValueError(f"warm start: {path} shares no tensor (name and shape) with this run's {side}; "
                         f"is it a checkpoint of this model? It holds e.g. {sorted(saved)[:3]}")
    module.load_state_dict(matching, strict=False)
    return Matched(copied=sorted(matching), new=sorted(k for k in own if k not in saved),
                   reshaped=sorted(k for k in own if k in saved and k not in matching),
                   unused=sorted(k for k in saved if k not in own))


def load_config(checkpoint_dir: str | Path):
    from vid2vid.config import Config, apply_mapping

    path = Path(checkpoint_dir) / CONFIG
    if not path.is_file():
        raise CheckpointError(f"{checkpoint_dir}: no {CONFIG}; is it a vid2vid training checkpoint?")
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint's config ({err})") from None
    return apply_mapping(Config(), values)


def load_generator(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """(config, GeneratorSide in eval mode) from a training checkpoint directory."""
    from vid2vid.models.vid2vid import GeneratorSide

    cfg = load_config(checkpoint_dir)
    g = GeneratorSide(cfg.model)
    path = weights_path(checkpoint_dir, "generator")
    try:
        g.load_state_dict(read_weights(path))
    except RuntimeError as err:  # missing, unexpected or mis-shaped keys
        raise WeightsError(f"{path}: does not fit the model of {path.parent.parent / CONFIG} "
                           f"({str(err).splitlines()[0]}; {len(str(err).splitlines())} lines of differences)") from None
    return cfg, g.to(device).eval()
