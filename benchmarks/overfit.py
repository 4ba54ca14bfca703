"""Overfit check: the smoke model trained on ONE real Cityscapes clip at 128x64 (plain PyTorch steps,
the same step code the Ray workers run) must drive the L1 distance between generated and real frames
clearly down. Prints L1 (in grey levels, 0..255) before and during training.

    .venv/bin/python benchmarks/overfit.py [steps=300] [sample=$VID2VID_SAMPLE_DATA/cityscapes_sample]
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from vid2vid.config import Config, load_config
from vid2vid.datasets.shards import Clip, iter_clips
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vid2vid import GeneratorSide, generate_sequence
from vid2vid.training.engine import PlainEngine
from vid2vid.training.inputs import clip_inputs
from vid2vid.training.step import colocated_step

REPO = Path(__file__).resolve().parent.parent


def one_real_clip(sample: Path, out: Path, frames: int = 6) -> tuple[Config, Clip]:
    """Prepare the first sequence of the sample at 128x64 (DIS flow) and return its first clip."""
    import ray

    from vid2vid.datasets.prepare import prepare

    cfg = load_config(["preset=smoke", f"data.source={sample}", f"data.out={out}", "data.resolution=128x64",
                       f"data.clip_len={frames}", f"train.n_frames_total={frames}"])
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False)
    prepare(cfg.data, progress=False)
    return cfg, next(iter_clips(out, "train"))


def l1_grey(g: GeneratorSide, cfg: Config, clip: Clip) -> float:
    with torch.no_grad():
        prepared = clip_inputs(cfg.model, clip, clip.num_frames, encoder=g)
        seq = generate_sequence(g, cfg.model, prepared.inputs, clip.num_frames)
    return float((seq.frames - clip.frames).abs().mean()) * 127.5


def overfit(cfg: Config, clip: Clip, steps: int, every: int = 50, lr: float = 2e-4) -> list[tuple[int, float]]:
    torch.manual_seed(0)
    g, d = GeneratorSide(cfg.model), DiscriminatorSide(cfg.model)
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=lr, betas=(0.5, 0.999)))
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=lr, betas=(0.5, 0.999)))
    objective, rng = Objective(cfg.model), torch.Generator().manual_seed(0)
    curve = [(0, l1_grey(g, cfg, clip))]
    for step in range(1, steps + 1):
        colocated_step(ge, de, objective, cfg.model, clip, clip.num_frames, rng)
        if step % every == 0 or step == steps:
            curve.append((step, l1_grey(g, cfg, clip)))
    return curve


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    steps = int(args.get("steps", 300))
    if "sample" not in args and not os.environ.get("VID2VID_SAMPLE_DATA"):
        sys.exit("give sample=<cityscapes_sample folder> or set VID2VID_SAMPLE_DATA (see the README's Data section)")
    sample = Path(args.get("sample") or Path(os.environ["VID2VID_SAMPLE_DATA"]) / "cityscapes_sample")
    with tempfile.TemporaryDirectory() as tmp:
        cfg, clip = one_real_clip(sample, Path(tmp) / "shards")
        t0 = time.perf_counter()
        curve = overfit(cfg, clip, steps)
    print(f"one clip of {sample.name}, {clip.num_frames} frames at 128x64, smoke model, {steps} steps "
          f"in {time.perf_counter() - t0:.0f} s")
    for step, l1 in curve:
        print(f"  step {step:4d}: L1(generated, real) = {l1:6.2f} grey levels")
    print(f"  reduction: {curve[0][1] / curve[-1][1]:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
