"""The on-disk format of a training run's checkpoints: file names, their writers and readers, and the
loaders that every layer (eval, generate, platform) uses to get a model back.

Layout of a run folder (``<train.run_dir>/ray/<run name>``, Ray Train's) and of one checkpoint::

    mlflow_run_id.txt               the run's MLflow run id: evaluation and resumes log into that run
    checkpoint_*/
        vid2vid-checkpoint.json     the manifest: format version, engine names, the training state
                                    (schedule, data position, step)
        config.json                 the run's resolved config
        <side>/weights.pt           plain state dict of the generator or discriminator side
        <side>/state/...            DeepSpeed files of that engine (vid2vid.platform.checkpointer)
        ranks/<global rank>.json    what one rank alone holds: the state of its phi_I/phi_V generator

``config.json`` and ``<side>/weights.pt`` make a checkpoint usable without DeepSpeed: a model loads
with ``torch.load(weights_only=True)``. Ray Train merges the folders that every rank writes, so each
file has one writer: the manifest and the config global rank 0, a side's weights the first rank of
its group, a rank file its own rank. A resume needs the same number of workers (rank r reads
``ranks/r.json``).

Readers take a folder or a URI (a checkpoint in S3: see :mod:`vid2vid.storage`); writers a local
folder (Ray Train uploads it). Torch is imported only where weights are read or written: the command
line resolves ``checkpoint=`` through this module, and a wrong path fails before torch loads.
"""

from __future__ import annotations

import base64
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from vid2vid import storage
from vid2vid.config import Config, apply_mapping, to_dict
from vid2vid.errors import CheckpointError, WeightsError

if TYPE_CHECKING:
    import torch
    from torch import nn

    from vid2vid.models.vid2vid import GeneratorSide

FORMAT = 1
MANIFEST = "vid2vid-checkpoint.json"
CONFIG = "config.json"
WEIGHTS = "weights.pt"
RANKS = "ranks"
RUN_ID_FILE = "mlflow_run_id.txt"


# ------------------------------------------------------------------------------------------------
# The manifest and the training step


@dataclass(frozen=True)
class Manifest:
    """What ``vid2vid-checkpoint.json`` holds."""

    engines: list[str]  # every engine of the run, even those another rank wrote (split placement)
    state: dict[str, Any]  # the training loop's state (ScheduleState.to_dict()), JSON

    @property
    def step(self) -> int:
        return int(self.state["step"])

    def to_json(self) -> str:
        try:
            return json.dumps({"format": FORMAT, "engines": sorted(self.engines), "state": self.state},
                              indent=1, sort_keys=True)
        except TypeError as exc:
            raise TypeError(f"write_checkpoint: state must be JSON-serialisable ({exc})") from None


def write_manifest(directory: str | Path, manifest: Manifest) -> Path:
    path = Path(directory) / MANIFEST
    path.write_text(manifest.to_json())
    return path


def read_manifest(directory: str | Path) -> Manifest:
    """The checkpoint's manifest, or a FileNotFoundError saying the folder is no vid2vid checkpoint."""
    path = storage.join(directory, MANIFEST)
    values = storage.read_json(path, FileNotFoundError(f"{directory} is not a vid2vid checkpoint: no {MANIFEST}"))
    if values.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {values.get('format')!r}, this code reads {FORMAT}")
    return Manifest(engines=list(values.get("engines", [])), state=values["state"])


def read_state(directory: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint, without loading any engine."""
    return read_manifest(directory).state


def checkpoint_step(checkpoint_dir: str | Path, step: int | None = None) -> int:
    """``step`` if given, else the training step saved in the checkpoint's manifest."""
    if step is not None:
        return int(step)
    try:
        return read_manifest(checkpoint_dir).step
    except FileNotFoundError:
        raise FileNotFoundError(f"{checkpoint_dir}: no {MANIFEST} to read the training step from; "
                                f"pass step=N") from None


def complete_checkpoint_step(folder: Path) -> int | None:
    """The training step of a complete local checkpoint folder (config and manifest written); None when
    it is not one (still being written, or something else)."""
    if not (folder / CONFIG).is_file():
        return None
    try:
        return read_manifest(folder).step
    except (OSError, ValueError, KeyError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------
# What one rank alone holds


def write_rank_state(directory: str | Path, rank: int, state: dict[str, Any]) -> Path:
    """``state`` (JSON; see :func:`encode_rng`) of global rank ``rank``."""
    path = Path(directory) / RANKS / f"{rank}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(state))
    return path


def read_rank_state(directory: str | Path, rank: int) -> dict[str, Any] | None:
    """What ``rank`` saved; None for a checkpoint written before ranks saved anything."""
    path = Path(directory) / RANKS / f"{rank}.json"
    if not path.parent.is_dir():
        return None
    if not path.is_file():
        found = sorted(p.name for p in (Path(directory) / RANKS).glob("*.json"))
        raise FileNotFoundError(f"checkpoint {directory}: no {RANKS}/{rank}.json for rank {rank} (found {found}); "
                                "resume with the train.num_workers and train.placement it was written with")
    return json.loads(path.read_text())


def encode_rng(generator: torch.Generator) -> str:
    """A ``torch.Generator``'s state as text (for a JSON file)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode("ascii")


def decode_rng(text: str, generator: torch.Generator) -> torch.Generator:
    import torch

    generator.set_state(torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8))
    return generator


# ------------------------------------------------------------------------------------------------
# Plain weights


def weights_path(checkpoint_dir: str | Path, side: str) -> str:
    """Where a side's weights are in a checkpoint; a :class:`CheckpointError` when they are not."""
    path = storage.join(checkpoint_dir, side, WEIGHTS)
    if not storage.is_file(path):
        raise CheckpointError(f"{checkpoint_dir}: no {side}/{WEIGHTS}; is it a vid2vid training checkpoint?")
    return path


def save_weights(checkpoint_dir: str | Path, side: str, module: nn.Module) -> Path:
    import torch

    path = Path(checkpoint_dir) / side / WEIGHTS
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(module.state_dict(), path)
    return path


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """A plain state dict from a local file or a URI, or a :class:`WeightsError` naming the file (a
    truncated or overwritten file otherwise fails deep inside torch with e.g. ``KeyError: 174812789``)."""
    import torch

    try:
        source = io.BytesIO(storage.read_bytes(path)) if storage.is_uri(path) else path
        state = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read it is the file's
        raise WeightsError(f"{path}: cannot read the weights ({type(err).__name__}: {str(err)[:200]}); the file is "
                           f"damaged or not a torch state dict") from None
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict, found a {type(state).__name__}")
    return state


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
    """Copy every tensor whose name and shape match into ``module`` (a warm start).

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


# ------------------------------------------------------------------------------------------------
# The run's config, and the model it describes


def save_config(checkpoint_dir: str | Path, cfg: Config) -> Path:
    path = Path(checkpoint_dir) / CONFIG
    path.write_text(json.dumps(to_dict(cfg), indent=1))
    return path


def load_config(checkpoint_dir: str | Path) -> Config:
    """The config a checkpoint was trained with."""
    path = storage.join(checkpoint_dir, CONFIG)
    missing = CheckpointError(f"{checkpoint_dir}: no {CONFIG}; is it a vid2vid training checkpoint?")
    try:
        values = storage.read_json(path, missing)
    except CheckpointError:
        raise
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint's config ({err})") from None
    return apply_mapping(Config(), values)


class LoadedGenerator(NamedTuple):
    cfg: Config
    generator: GeneratorSide  # in eval mode


def load_generator(checkpoint_dir: str | Path, device: str | torch.device = "cpu") -> LoadedGenerator:
    """The generator side of a checkpoint, rebuilt from its config and weights, in eval mode."""
    from vid2vid.models.vid2vid import GeneratorSide  # here: it imports torch (see the module docstring)

    cfg = load_config(checkpoint_dir)
    g = GeneratorSide(cfg.model)
    path = weights_path(checkpoint_dir, "generator")
    try:
        g.load_state_dict(read_weights(path))
    except RuntimeError as err:  # missing, unexpected or mis-shaped keys
        raise WeightsError(f"{path}: does not fit the model of {storage.join(checkpoint_dir, CONFIG)} "
                           f"({str(err).splitlines()[0]}; {len(str(err).splitlines())} lines of differences)") from None
    return LoadedGenerator(cfg, g.to(device).eval())


# ------------------------------------------------------------------------------------------------
# The run folder's run-id file


def run_id_path(run_folder: str | Path) -> str:
    """Where the trainer keeps a run's MLflow run id, beside its checkpoints (run_folder may be a URI)."""
    return storage.join(run_folder, RUN_ID_FILE)


def read_run_id(run_folder: str | Path) -> str | None:
    """The MLflow run id of ``<run_dir>/ray/<run_name>``, None when absent or empty."""
    try:
        return storage.read_text(run_id_path(run_folder)).strip() or None
    except FileNotFoundError:
        return None
