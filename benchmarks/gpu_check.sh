#!/usr/bin/env bash
# The GPU check (issue 19), one script, under 10 minutes on one H200. From the repository root:
#
#     PY=.venv/bin/python OUT=/tmp/gpu-check bash benchmarks/gpu_check.sh
#
# 1. the product on the GPU: experiments/cityscapes.py (Ray Train + Ray Data + DeepSpeed + MLflow), a
#    512x256 Cityscapes-sized model (preset cityscapes_512) on synthetic scenes, bf16, 1 worker, 20 steps;
#    its frames/s beside benchmarks/train_step.py's on the same model and clip length (ratio, bar 0.95);
# 2. the same run resumed for 5 more steps from its checkpoint;
# 3. pytest -m gpu (engines, checkpoints, feature nets and the Ray Train job test on CUDA);
# 4. the cityscapes_2048 generator at 2048x1024 in bf16, >= 60 frames, then the speed levers.
# Every figure it prints comes with the command that printed it, for the closing note.
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-$(mktemp -d /tmp/gpu-check.XXXX)}
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled
unset DS_ACCELERATOR  # DeepSpeed must detect CUDA (the Makefile pins it to cpu for the CPU suite)
mkdir -p "$OUT"
step() { echo; echo "=== $* ==="; }

JOB=(preset=cityscapes_512 data.source=synthetic data.resolution=512x256 data.clip_len=6
     data.synthetic_sequences=8 data.synthetic_frames=12 "data.out=$OUT/shards" "train.run_dir=$OUT/runs"
     train.run_name=gpu-check train.num_workers=1 train.placement=colocated train.use_gpu=true
     train.precision=bf16 train.n_frames_total=6 train.max_frames_total=6 train.checkpoint_every=10)

step "1. Ray Train job on CUDA: 20 steps"
( set -x; timeout 300 "$PY" experiments/cityscapes.py "${JOB[@]}" train.max_steps=20 ) 2>&1 | tail -25

step "1b. the same model and clip length as a bare step (benchmarks/train_step.py)"
( set -x; timeout 180 "$PY" benchmarks/train_step.py preset=cityscapes_512 size=512x256 frames=6 precision=bf16 \
    repeats=5 ) 2>&1 | tee "$OUT/train_step.txt" | tail -6

step "2. resume for 5 more steps"
( set -x; timeout 240 "$PY" experiments/cityscapes.py "${JOB[@]}" train.max_steps=25 ) 2>&1 | tail -12

step "job vs bare step"
"$PY" - "$OUT" <<'EOF'
import re, statistics, sys
from pathlib import Path
from mlflow.tracking import MlflowClient
out = Path(sys.argv[1])
client = MlflowClient(f"sqlite:///{out / 'runs' / 'mlflow.db'}")
run_id = (next((out / "runs" / "ray").rglob("mlflow_run_id.txt"))).read_text().strip()
hist = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "frames_per_s"))
steps = [s for s, _ in hist]
print(f"steps logged: {steps[0]}..{steps[-1]} ({len(steps)}), resumed run continues: {steps == list(range(1, 26))}")
job = statistics.median(v for s, v in hist if 3 <= s <= 20)  # after warm-up, before the resume
bare = float(re.findall(r"\(([\d.]+) frames/s\)", (out / "train_step.txt").read_text())[-1])
print(f"job {job:.2f} frames/s (median of steps 3-20), bare step {bare:.2f} frames/s")
print(f"ratio job_vs_bare_step_gpu: {job / bare:.3f} (bar 0.95)")
EOF

step "3. GPU tests"
( set -x; timeout 600 "$PY" -m pytest -q -m gpu tests/test_gpu.py ) 2>&1 | tail -8

step "4. cityscapes_2048 generator, 2048x1024, bf16"
( set -x; timeout 600 "$PY" benchmarks/generate.py mode=speed preset=cityscapes_2048 device=cuda precision=bf16 \
    frames=60 levers=channels_last,compile,cudagraphs ) 2>&1 | tail -12
