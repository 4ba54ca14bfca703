"""Overfit check on real data: one Cityscapes clip at 128x64, the smoke model, L1 must drop clearly."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _overfit_module():
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "overfit.py"
    spec = importlib.util.spec_from_file_location("overfit_bench", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_model_overfits_one_real_clip(sample_data, ray_cluster, tmp_path):
    bench = _overfit_module()
    cfg, clip = bench.one_real_clip(sample_data / "cityscapes_sample", tmp_path / "shards", frames=4)
    curve = bench.overfit(cfg, clip, steps=30, every=30)
    (_, before), (_, after) = curve[0], curve[-1]
    print(f"L1 before {before:.2f}, after 30 steps {after:.2f} grey levels")
    assert after < 0.5 * before, curve
