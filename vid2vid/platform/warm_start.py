"""Loading trained weights by name: warm starts from a lower-resolution run, and model files for
evaluation and generation.

Every checkpoint holds, besides the DeepSpeed state, ``<side>/weights.pt`` (a plain state dict of the
generator or discriminator side) and ``config.json`` (the run's resolved config), so a checkpoint is
usable without DeepSpeed and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from vid2vid import storage

WEIGHTS = "weights.pt"
CONFIG = "config.json"


def weights_path(checkpoint_dir: str | Path, side: str) -> str:
    """Location of a side's weights in a checkpoint (a folder, or a URI: see :mod:`vid2vid.storage`)."""
    path = storage.join(checkpoint_dir, side, WEIGHTS)
    if not storage.is_file(path):
        raise FileNotFoundError(f"{checkpoint_dir}: no {side}/{WEIGHTS}; is it a vid2vid training checkpoint?")
    return path


def load_state(path: str | Path) -> dict:
    """A saved state dict, from a local file or a URI (``weights_only``: plain tensors, no pickled code)."""
    source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
    return torch.load(source, map_location="cpu", weights_only=True)


def save_weights(checkpoint_dir: str | Path, side: str, module: nn.Module) -> Path:
    path = Path(checkpoint_dir) / side / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


def load_matching(module: nn.Module, checkpoint_dir: str | Path, side: str) -> list[str]:
    """Copy every tensor whose name and shape match; return the names of the module's new tensors.

    A 1024 run warm-started from a 512 run: the 512 model's global generator becomes ``scales.0`` of
    the new one (both runs name their coarsest scale ``scales.0``), the local enhancer is new.
    Discriminators whose shapes changed (more scales) keep their fresh initialisation for those layers.
    """
    saved = load_state(weights_path(checkpoint_dir, side))
    own = module.state_dict()
    matching = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    module.load_state_dict(matching, strict=False)
    return sorted(k for k in own if k not in matching)


def load_config(checkpoint_dir: str | Path):
    from vid2vid.config import Config, apply_mapping

    try:
        text = storage.read_text(storage.join(checkpoint_dir, CONFIG))
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir}: no {CONFIG}; is it a vid2vid training checkpoint?") from None
    return apply_mapping(Config(), json.loads(text))


def load_generator(checkpoint_dir: str | Path, device: str | torch.device = "cpu"):
    """(config, GeneratorSide in eval mode) from a training checkpoint directory."""
    from vid2vid.models.vid2vid import GeneratorSide

    cfg = load_config(checkpoint_dir)
    g = GeneratorSide(cfg.model)
    state = load_state(weights_path(checkpoint_dir, "generator"))
    g.load_state_dict(state)
    return cfg, g.to(device).eval()
