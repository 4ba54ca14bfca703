"""Checkpoints of DeepSpeed engines for ``ray.train.report(..., checkpoint=...)``.

Each rank saves what it owns into its own local folder and reports it; Ray Train merges the folders
of all ranks into one checkpoint. DeepSpeed writes one ZeRO shard per data-parallel rank (and the
weights once per group) under ``<engine name>/state/``; in ``split`` placement a G rank writes
``generator/``, a D rank ``discriminator/``. Everything else in the folder (manifest, rank files,
plain weights, config) is the format of :mod:`vid2vid.checkpoints`, written through it.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vid2vid.checkpoints import Manifest, read_manifest, write_manifest, write_rank_state
from vid2vid.platform.engines import load_engines, save_engines


def _global_rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def write_checkpoint(directory: str | Path, engines: Mapping[str, Any], state: dict[str, Any],
                     all_engines: list[str] | None = None, rank_state: dict[str, Any] | None = None) -> Path:
    """Save this rank's ``engines`` and the JSON-serialisable ``state`` into ``directory``.

    ``all_engines`` names every engine of the run (default: this rank's), so a split-placement
    checkpoint lists both sides even though rank 0 holds only the generator. ``rank_state`` (JSON,
    see :func:`vid2vid.checkpoints.encode_rng`) is what this rank alone holds.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(engines=sorted(all_engines or engines), state=state)
    manifest.to_json()  # a state that is no JSON fails before any engine file is written
    # The state lives in the manifest only: a discriminator rank of the split placement does not know
    # G's schedule, so a copy in its engine's files would say something else.
    save_engines(directory, engines, client_state={})
    rank = _global_rank()
    if rank_state is not None:
        write_rank_state(directory, rank, rank_state)
    if rank == 0:
        write_manifest(directory, manifest)
    return directory


def read_checkpoint(checkpoint: Any, engines: Mapping[str, Any]) -> dict[str, Any]:
    """Load ``engines`` (weights and optimizer states) and return the saved training state.

    ``checkpoint`` is a directory or a ``ray.train.Checkpoint`` (anything with ``as_directory``).
    """
    if hasattr(checkpoint, "as_directory"):
        with checkpoint.as_directory() as directory:
            return read_checkpoint(directory, engines)
    manifest = read_manifest(checkpoint)
    missing = sorted(set(engines) - set(manifest.engines))
    if missing:
        raise KeyError(f"checkpoint {checkpoint}: no engine(s) {missing}; it holds {manifest.engines}")
    load_engines(checkpoint, engines)
    return manifest.state

