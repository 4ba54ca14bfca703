"""The paper's Table 2 ablation as one Ray Tune sweep, compared in MLflow.

    python experiments/ablations.py preset=smoke                          # 4 variants x seed 0, laptop
    python experiments/ablations.py preset=cityscapes_512 seeds=[0,1,2] data.source=/data/cityscapes_vid2vid
    python experiments/ablations.py preset=smoke variants=[full,no_flow_warping] grid.train.lr=[1e-4,2e-4]
    ray job submit --working-dir . -- python experiments/ablations.py preset=cityscapes_512 \
        train.run_dir=/shared/runs data.out=/shared/shards/cs512 name=table2

Sweep options (see ``vid2vid.platform.sweep.SweepConfig``): ``name``, ``variants``, ``seeds``,
``grid.<config key>=[...]``, ``max_concurrent_trials``, ``trial_cpus``, ``max_failures``, ``evaluate``.
Everything else is a config override; ``preset=NAME`` defaults to ``smoke``. Running the same command
(same ``name``) again after the driver died resumes the sweep: finished trials are not re-run.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vid2vid.console import run_main  # noqa: E402
from vid2vid.platform.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main("experiments/ablations.py", lambda args: main(args, default_preset="smoke"), sys.argv[1:]))
