"""One full vid2vid G+D training step (all losses) against a dense convolution, on this machine's
CPU (or GPU, fp32 and bf16), alternating in one run.

Shapes: the reference's single-GPU 256 model by default (ngf 128, 2 downsamplings, 9 blocks, one D
scale), 256x128, batch 1, ``frames`` generated per step; the dense reference is a 256->256 3x3
convolution on 8 x 256 x H/4 x W/4 (the size of G's residual blocks), forward + backward. Threads:
torch's default (all cores) on both sides. Timed regions: one ``colocated_step`` (G forward, all
losses, backward, Adam; then D) against enough dense convolutions to take about as long; they run
ABBA-interleaved (benchmarks/timing.py), each round giving one paired ratio.

FLOPs are counted by torch's FlopCounterMode (forward + backward, convolutions and matrix products;
element-wise ops, norms and Adam count zero). Printed:

- the whole-step ratio: the step's counted GFLOP/s over the dense convolution's, per round;
- the convolutions-only ratio: the same FLOPs over the time the step spends inside convolution
  kernels (torch.profiler, one profiled step beside one profiled dense run), i.e. how well the step's
  own convolutions run; the rest of the step (norms, element-wise ops, padding, Adam) is printed as
  its share of the time.

    .venv/bin/python benchmarks/train_step.py                 # reference single-GPU 256 model
    .venv/bin/python benchmarks/train_step.py model.ngf=32 frames=2 rounds=5
    python benchmarks/train_step.py preset=cityscapes_512 size=512x256 frames=6   # on a GPU

On a GPU it runs fp32 and bf16 autocast side by side (``precision=both``, the default there) and
prints the speed-up; TF32 stays at PyTorch's defaults (off for matmuls, on for cuDNN convolutions).

The VGG term uses random weights saved in torchvision's format: the benchmark times the computation
and never reports a loss value.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from timing import Summary, interleaved, paired_ratios, print_ratio
from torch.utils.flop_counter import FlopCounterMode

from vid2vid.config import ModelConfig, TrainConfig, apply_mapping, load_preset, parse_overrides
from vid2vid.datasets.labels import instance_edges
from vid2vid.datasets.shards import Clip
from vid2vid.datasets.synthetic import make_sequence
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vgg import VGG19
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.engines import forward_precision
from vid2vid.training.engine import PlainEngine
from vid2vid.training.step import colocated_step

# Reference scripts/street/train_g1_256.sh: ngf 128, 2 downsamplings, 9 blocks, one D scale.
DEFAULTS = {"ngf": 128, "n_downsample_G": 2, "n_blocks": 9, "num_D": 1}


def synthetic_clip(width: int, height: int, frames: int, device: torch.device) -> Clip:
    seq = make_sequence(frames, width, height, seed=0)
    edges = np.stack([instance_edges(i) for i in seq.instances])
    to = lambda a, dt=torch.float32: torch.from_numpy(np.ascontiguousarray(a)).to(device, dt)[None]  # noqa: E731
    frames_t = to(seq.frames).permute(0, 1, 4, 2, 3) / 127.5 - 1
    flow = to(seq.flow).permute(0, 1, 4, 2, 3)
    conf = torch.ones(1, frames, 1, height, width, device=device)
    conf[:, 0] = 0
    return Clip(to(seq.labels, torch.long), to(edges), to(seq.instances, torch.long), frames_t, flow, conf)



def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def conv_kernel_seconds(fn) -> tuple[float, float]:
    """(seconds inside convolution kernels, wall seconds) of one profiled ``fn()``: the self time of every
    op whose name holds "conv" (forward and backward, any backend), not "convert"."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    device = "cuda" if torch.cuda.is_available() else "cpu"
    conv_us = sum(getattr(e, f"self_{device}_time_total") for e in prof.key_averages()
                  if "conv" in e.key.lower() and "convert" not in e.key.lower())
    return conv_us / 1e6, wall


def main(argv: list[str]) -> int:
    overrides = parse_overrides(argv)
    frames = int(overrides.pop("frames", 2))
    rounds = int(overrides.pop("rounds", overrides.pop("repeats", 4)))
    width, height = (int(v) for v in str(overrides.pop("size", "128x64")).split("x"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precisions = str(overrides.pop("precision", "both" if device.type == "cuda" else "fp32"))
    precisions = ["fp32", "bf16"] if precisions == "both" else [precisions]
    model = dict(DEFAULTS)
    if "preset" in overrides:
        model = load_preset(str(overrides.pop("preset"))).get("model", {})
    cfg = apply_mapping(ModelConfig(), {**model, **{k.removeprefix("model."): v for k, v in overrides.items()}})
    with tempfile.TemporaryDirectory() as tmp:
        vgg_path = Path(tmp) / "vgg19_random.pth"
        torch.save({f"features.{k}": v for k, v in VGG19().features.state_dict().items()}, vgg_path)
        cfg.vgg_weights = str(vgg_path)
        objective = Objective(cfg).to(device)
    torch.manual_seed(0)
    g, d = GeneratorSide(cfg).to(device), DiscriminatorSide(cfg).to(device)
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=2e-4, betas=(0.5, 0.999)))
    clip = synthetic_clip(width, height, frames, device)
    rng = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(256, 256, 3, padding=1).to(device)
    x = torch.randn(8, 256, 32, 64, device=device, requires_grad=True)  # one size for every model
    n_params = sum(p.numel() for p in g.parameters()) + sum(p.numel() for p in d.parameters())
    print(f"device {device}, torch threads {torch.get_num_threads()}, {width}x{height}, batch 1, {frames} frames/step, "
          f"ngf {cfg.ngf}, params {n_params / 1e6:.1f}M; dense reference: 3x3 conv 256->256 on "
          f"8x256x32x64, forward + backward; {rounds} ABBA rounds after a warm-up")

    rates = {}
    for precision in precisions:
        ctx = forward_precision(TrainConfig(precision=precision), device)

        def train_step(ctx=ctx):
            return colocated_step(ge, de, objective, cfg, clip, frames, rng, precision=ctx)

        def conv_step(ctx=ctx):
            with ctx():
                y = conv(x)
            y.float().sum().backward()

        step_flops, conv_flops = count_flops(train_step), count_flops(conv_step)  # also the warm-ups
        # the share of each side's time spent inside convolution kernels (one profiled run each); it
        # also sizes a round: as many dense convolutions as take about as long as one step
        step_conv_s, step_wall = conv_kernel_seconds(train_step)
        dense_conv_s, dense_wall = conv_kernel_seconds(conv_step)
        per_round = max(1, round(step_wall / dense_wall))

        def dense(conv_step=conv_step, per_round=per_round):
            for _ in range(per_round):
                conv_step()

        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t = interleaved({"step": train_step, "dense": dense}, rounds=rounds, warmup=0)
        step_rate = [step_flops / s / 1e9 for s in t["step"]]
        dense_rate = [per_round * conv_flops / s / 1e9 for s in t["dense"]]
        whole = paired_ratios(step_rate, dense_rate)
        # the step's FLOPs over its time in convolution kernels, against the dense run's the same way
        step_share, dense_share = step_conv_s / step_wall, dense_conv_s / dense_wall
        conv_only = Summary.of([r * dense_share / step_share for r in
                                (a / b for a, b in zip(step_rate, dense_rate, strict=True))])
        step_med = Summary.of(t["step"]).median
        rates[precision] = frames / step_med
        memory = (f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                  if device.type == "cuda" else "")
        print(f"[{precision}] train step : {Summary.of(t['step']).format(' s')}  {step_flops / 1e9:.1f} GFLOP  "
              f"{Summary.of(step_rate).format(' GFLOP/s', digits=1)}  ({frames / step_med:.2f} frames/s){memory}")
        print(f"[{precision}] dense conv : {per_round} x {conv_flops / 1e9:.2f} GFLOP per round  "
              f"{Summary.of(dense_rate).format(' GFLOP/s', digits=1)}")
        print(f"[{precision}] time in convolution kernels (profiled): step {100 * step_share:.0f}% (the rest: "
              f"norms, element-wise ops, padding, Adam), dense run {100 * dense_share:.0f}%")
        print(f"[{precision}] whole step / dense conv throughput, per round: {whole.format('', digits=2)}")
        print(f"[{precision}] convolutions only / dense conv throughput: {conv_only.format('', digits=2)}")
    if len(rates) == 2:
        print(f"bf16 / fp32 train-step speed-up: {rates['bf16'] / rates['fp32']:.2f}x")
    # the promise: the step runs the machine's convolutions at a fair share of a dense one's speed
    return 0 if print_ratio("train_step_vs_dense_conv", whole.median, ">= 0.5") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
