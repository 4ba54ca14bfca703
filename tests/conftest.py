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


@pytest.fixture(scope="module")
def world1(tmp_path_factory):
    """This process as a torch.distributed world of one (gloo), so DeepSpeed engines can be built here."""
    import torch.distributed as dist

    env = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield
    from deepspeed.utils import groups

    groups._WORLD_GROUP, groups.mpu = None, None  # DeepSpeed caches groups of this process group
    dist.destroy_process_group()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def has_cuda() -> bool:
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if has_cuda():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine (CI never has one)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
