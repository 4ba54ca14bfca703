"""Train (and evaluate) vid2vid pose->body: DensePose + OpenPose concatenated, logged to MLflow.

    python experiments/pose.py preset=pose_smoke                 # laptop: the shared 5-frame sample
    python experiments/pose.py data.source=/data/dance train.num_workers=8
    ray job submit --working-dir . -- python experiments/pose.py preset=pose_512 \
        data.source=/shared/dance train.run_dir=/shared/runs data.out=/shared/shards/pose512

``data.source`` holds ``pose_maps-densepose/<seq>/``, ``poses-openpose/<seq>/`` and ``images/<seq>/``
(see ``vid2vid.datasets.pose``; the train split gets the random scale-and-crop when prepared).
Arguments are ``key=value`` overrides of the typed config (``--verbose`` shows Ray's own logs and
tracebacks); ``preset=NAME`` loads
``experiments/configs/NAME.yaml`` (default: ``pose_512``). On a cluster, give ``train.run_dir`` and
``data.out`` on storage every node sees: the job's working directory is a temporary copy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vid2vid.platform.experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_preset="pose_512", prog="experiments/pose.py"))
