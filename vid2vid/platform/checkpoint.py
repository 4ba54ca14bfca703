"""Checkpoint directories for ``ray.train.report(..., checkpoint=...)``, independent of the model.

Layout of one checkpoint directory::

    vid2vid-checkpoint.json     format version, engine names, the training state (schedule, data position)
    <engine name>/state/...     DeepSpeed files of that engine: weights, optimizer state, ZeRO shards
    ranks/<global rank>.json    what one rank alone holds: the state of its phi_I/phi_V generator

Every rank writes into its own local directory and reports it; Ray Train merges the directories of
all ranks into one checkpoint, so each rank must write only what it owns: DeepSpeed writes one ZeRO
shard per data-parallel rank (and the weights once per group), and the JSON file is written by global
rank 0. In ``split`` placement a G rank writes ``generator/``, a D rank ``discriminator/``. A resume
needs the same number of workers: rank r reads back ``ranks/r.json``.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vid2vid import storage
from vid2vid.platform.engines import load_engines, save_engines

FORMAT = 1
MANIFEST = "vid2vid-checkpoint.json"
RANKS = "ranks"


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_checkpoint(directory: str | Path, engines: Mapping[str, Any], state: dict[str, Any],
                     all_engines: list[str] | None = None, rank_state: dict[str, Any] | None = None) -> Path:
    """Save this rank's ``engines`` and the JSON-serialisable ``state`` into ``directory``.

    ``all_engines`` names every engine of the run (default: this rank's), so a split-placement
    checkpoint lists both sides even though rank 0 holds only the generator. ``rank_state`` (JSON,
    see :func:`encode_rng`) is what this rank alone holds; :func:`read_rank_state` returns it.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        text = json.dumps({"format": FORMAT, "engines": sorted(all_engines or engines), "state": state},
                          indent=1, sort_keys=True)
    except TypeError as exc:
        raise TypeError(f"write_checkpoint: state must be JSON-serialisable ({exc})") from None
    # The state lives in the manifest only: a discriminator rank of the split placement does not know
    # G's schedule, so a copy in its engine's files would say something else.
    save_engines(directory, engines, client_state={})
    if rank_state is not None:
        (directory / RANKS).mkdir(exist_ok=True)
        (directory / RANKS / f"{_global_rank()}.json").write_text(json.dumps(rank_state))
    if _global_rank() == 0:
        (directory / MANIFEST).write_text(text)
    return directory


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
    state = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    generator.set_state(state)
    return generator


def read_state(directory: str | Path) -> dict[str, Any]:
    """The training state of a checkpoint directory, without loading any engine."""
    return read_manifest(directory)["state"]


def read_manifest(directory: str | Path) -> dict[str, Any]:
    """The checkpoint's JSON file; ``directory`` may be a URI (a checkpoint in S3: see vid2vid.storage)."""
    path = storage.join(directory, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        raise FileNotFoundError(f"{directory} is not a vid2vid checkpoint: no {MANIFEST}") from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: checkpoint format {manifest.get('format')!r}, this code reads {FORMAT}")
    return manifest


def read_checkpoint(checkpoint: Any, engines: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``engines`` (weights and optimizer states) and return the saved state.

    ``checkpoint`` is a directory or a ``ray.train.Checkpoint`` (anything with ``as_directory``).
    """
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as directory:
            return read_checkpoint(directory, engines)
    manifest = read_manifest(checkpoint)
    missing = sorted(set(engines) - set(manifest["engines"]))
    if missing:
        raise KeyError(f"checkpoint {checkpoint}: no engine(s) {missing}; it holds {manifest['engines']}")
    load_engines(checkpoint, engines)
    return manifest["state"]


def to_ray_checkpoint(directory: str | Path):
    """Wrap a written directory for ``ray.train.report(metrics, checkpoint=...)``."""
    from ray.train import Checkpoint

    return Checkpoint.from_directory(str(directory))
