"""Train (and evaluate) vid2vid sketch->face: dlib-68 landmarks rendered to face sketches, logged to MLflow.

    python experiments/face.py preset=face_smoke                 # laptop: the shared 5-frame sample
    python experiments/face.py data.source=/data/faceforensics train.num_workers=8
    ray job submit --working-dir . -- python experiments/face.py preset=face_512 \
        data.source=/shared/faceforensics train.run_dir=/shared/runs data.out=/shared/shards/face512

``data.source`` holds ``images/<seq>/`` and ``landmarks-dlib68/<seq>/`` (one JSON, .txt or .npy of 68
points per frame; ``vid2vid.datasets.face.extract_landmarks`` writes them with a user-installed dlib).
Arguments are ``key=value`` overrides of the typed config (``--verbose`` shows Ray's own logs and
tracebacks); ``preset=NAME`` loads
``experiments/configs/NAME.yaml`` (default: ``face_512``). On a cluster, give ``train.run_dir`` and
``data.out`` on storage every node sees: the job's working directory is a temporary copy.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from vid2vid.platform.experiment import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_preset="face_512", prog="experiments/face.py"))
