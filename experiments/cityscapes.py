"""Train (and evaluate) vid2vid on Cityscapes-style street scenes, logged to MLflow.

    python experiments/cityscapes.py preset=smoke                 # laptop: synthetic scenes, tiny model
    python experiments/cityscapes.py data.source=/data/cityscapes_vid2vid train.num_workers=8
    ray job submit --working-dir . -- python experiments/cityscapes.py preset=cityscapes_512 \
        data.source=/shared/cityscapes train.run_dir=/shared/runs data.out=/shared/shards/cs512

Arguments are ``key=value`` overrides of the typed config (``--verbose`` shows Ray's own logs and
tracebacks); ``preset=NAME`` loads
``experiments/configs/NAME.yaml`` (default: ``cityscapes_512``). On a cluster, give ``train.run_dir``
and ``data.out`` on storage every node sees: the job's working directory is a temporary copy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vid2vid.platform.experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_preset="cityscapes_512", prog="experiments/cityscapes.py"))
