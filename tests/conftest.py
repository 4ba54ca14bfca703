"""Shared fixtures: the real sample data (skips when absent), RAFT weights, one local Ray cluster."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SAMPLE_ENV = "VID2VID_SAMPLE_DATA"
WEIGHTS_ENV = "VID2VID_WEIGHTS"

torch.set_num_threads(min(2, os.cpu_count() or 1))


def _shared(env: str, default: Path) -> Path:
    return Path(os.environ.get(env, default))


@pytest.fixture(scope="session")
def sample_data() -> Path:
    """`../shared/data` (or $VID2VID_SAMPLE_DATA): real Cityscapes, pose/face and video samples."""
    root = _shared(SAMPLE_ENV, REPO.parent / "shared" / "data")
    if not (root / "cityscapes_sample").is_dir():
        pytest.skip(f"real sample data not found at {root}; set {SAMPLE_ENV} to the shared data folder")
    return root


@pytest.fixture(scope="session")
def raft_weights() -> Path:
    """The official RAFT-small checkpoint (`../shared/weights/raft-small.pth` or $VID2VID_WEIGHTS)."""
    path = _shared(WEIGHTS_ENV, REPO.parent / "shared" / "weights") / "raft-small.pth"
    if not path.is_file():
        pytest.skip(f"RAFT-small weights not found at {path}; set {WEIGHTS_ENV} to the weights folder")
    return path


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance shared by every test that needs Ray (2 CPUs, like CI)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from services import SHARED_RAY_INIT  # also what test_localhost.py checks

    if not ray.is_initialized():
        ray.init(**SHARED_RAY_INIT)
    yield ray
    ray.shutdown()


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (CI never has one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
