"""Time to the first training step, phase by phase, on the smoke preset.

    .venv/bin/python benchmarks/startup.py [key=value config overrides]

Runs what ``experiments/cityscapes.py preset=smoke`` runs (2 steps, then the evaluation), in this
process, in a temporary folder, and prints where the seconds before step 1 go: the driver's imports,
Ray's start, the shards, the driver's run setup (MLflow store, run, params), then Ray Train's start,
the worker's imports, the model and its DeepSpeed engines, the first batch and the first step (the
worker's ``startup/*`` metrics, see ``vid2vid/platform/startup.py``). Then it times DeepSpeed's CPU
communication op load alone in a fresh process: the part of the engines' time that is DeepSpeed's
JIT op, not the model.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

T_PROCESS = psutil.Process().create_time()
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from vid2vid.console import setup_logging  # noqa: E402
from vid2vid.platform import startup  # noqa: E402
from vid2vid.platform.experiment import run_experiment  # noqa: E402

T_IMPORTED = time.time()

OP_LOAD = """
import time, torch.distributed as dist
from deepspeed.accelerator import get_accelerator
t = time.perf_counter()
get_accelerator().create_op_builder("ShareMemCommBuilder").load(verbose=False)
print(time.perf_counter() - t)
"""


def op_load_seconds() -> float:
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    out = subprocess.run([sys.executable, "-c", OP_LOAD], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    import mlflow

    setup_logging()
    root = Path(tempfile.mkdtemp(prefix="v2v-startup-"))
    result = run_experiment([f"data.out={root / 'shards'}", f"train.run_dir={root / 'runs'}", "train.max_steps=2",
                             *argv], default_preset="smoke").train
    marks = startup.MARKS
    m = mlflow.tracking.MlflowClient(result.tracking_uri).get_run(result.mlflow_run_id).data.metrics
    worker = [("Ray Train start: controller, placement group, worker process", "startup/ray_train_s"),
              ("worker imports", "startup/imports_s"), ("model + DeepSpeed engines", "startup/engines_s"),
              ("first batch (checkpoint restore, Ray Data stream start)", "startup/first_batch_s"),
              ("the first step", "startup/step_s")]
    rows = [("driver imports (torch, Ray, the project)", T_IMPORTED - T_PROCESS),
            ("Ray start", marks["ray_ready"] - T_IMPORTED),
            ("shards (prepare the synthetic scenes)", marks["shards_ready"] - marks["ray_ready"]),
            ("driver run setup (MLflow store, run and params)", marks["fit"] - marks["shards_ready"]),
            *((name, m.get(key, float("nan"))) for name, key in worker)]
    total = sum(v for _, v in rows)
    print(f"\ntime to the first training step of preset=smoke: {total:.1f} s (process start -> step 1 done)")
    for name, seconds in rows:
        print(f"  {seconds:6.1f} s  {100 * seconds / total:4.0f}%  {name}")
    print(f"  DeepSpeed's CPU comm op load alone (cached build, a fresh process): {op_load_seconds():.1f} s")


if __name__ == "__main__":
    main(sys.argv[1:])
