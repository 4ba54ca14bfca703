"""One full vid2vid G+D training step (all losses) on this machine's CPU (or GPU, fp32 and bf16).

Prints the step's FLOPs (counted by torch's FlopCounterMode, forward + backward), its achieved
GFLOP/s, and the ratio to a dense 3x3 convolution (forward + backward) measured in the same run, so
the number says how far the whole step is from the machine's convolution throughput.

    .venv/bin/python benchmarks/train_step.py                 # reference single-GPU 256 model
    .venv/bin/python benchmarks/train_step.py model.ngf=32 frames=2
    python benchmarks/train_step.py preset=cityscapes_512 size=512x256 frames=6   # on a GPU

On a GPU it runs fp32 and bf16 autocast side by side (``precision=both``, the default there) and
prints the speed-up; TF32 stays at PyTorch's defaults (off for matmuls, on for cuDNN convolutions).

The VGG term uses random weights saved in torchvision's format: the benchmark times the computation
and never reports a loss value.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from timing import timed
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
from vid2vid.platform.step import PlainEngine, colocated_step

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


def main(argv: list[str]) -> None:
    overrides = parse_overrides(argv)
    frames = int(overrides.pop("frames", 4))
    repeats = int(overrides.pop("repeats", 3))
    width, height = (int(v) for v in str(overrides.pop("size", "256x128")).split("x"))
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
    x = torch.randn(8, 256, height // 4, width // 4, device=device, requires_grad=True)
    n_params = sum(p.numel() for p in g.parameters()) + sum(p.numel() for p in d.parameters())
    print(f"device {device}, threads {torch.get_num_threads()}, {width}x{height}, {frames} frames/step, "
          f"ngf {cfg.ngf}, params {n_params / 1e6:.1f}M")

    rates = {}
    for precision in precisions:
        ctx = forward_precision(TrainConfig(precision=precision), device)

        def train_step(ctx=ctx):
            return colocated_step(ge, de, objective, cfg, clip, frames, rng, precision=ctx)

        def conv_step(ctx=ctx):
            with ctx():
                y = conv(x)
            y.float().sum().backward()

        if precision == precisions[0]:
            step_flops, conv_flops = count_flops(train_step), count_flops(conv_step)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step_s, conv_s = timed(train_step, repeats), timed(conv_step, repeats * 3)
        step_rate, conv_rate = step_flops / step_s / 1e9, conv_flops / conv_s / 1e9
        rates[precision] = frames / step_s
        memory = (f"  peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
                  if device.type == "cuda" else "")
        print(f"[{precision}] train step : {step_s:8.3f} s  {step_flops / 1e9:9.1f} GFLOP  {step_rate:9.1f} GFLOP/s  "
              f"({frames / step_s:.2f} frames/s){memory}")
        print(f"[{precision}] dense conv : {conv_s:8.3f} s  {conv_flops / 1e9:9.1f} GFLOP  {conv_rate:9.1f} GFLOP/s")
        print(f"[{precision}] ratio train-step / dense-conv throughput: {step_rate / conv_rate:.2f}")
    if len(rates) == 2:
        print(f"bf16 / fp32 train-step speed-up: {rates['bf16'] / rates['fp32']:.2f}x")


if __name__ == "__main__":
    main(sys.argv[1:])
