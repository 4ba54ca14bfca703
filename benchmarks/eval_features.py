"""Feature-extraction throughput of the eval nets (I3D, ResNeXt-101-3D) in fp32 and bf16 autocast.

Random weights in the public formats (the real ones cannot be downloaded here); the timing does not
depend on the values. Prints clips/s for each precision and the bf16 / fp32 ratio, measured side by
side in one run, and how far bf16 features move from fp32 ones (relative L2), which bounds what bf16
extraction would do to a Fréchet distance.

    python benchmarks/eval_features.py                    # GPU: both precisions; CPU: fp32 only
    python benchmarks/eval_features.py batch=4 repeats=2 frames=16 size=112
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

import torch
from timing import timed

from vid2vid.config import parse_overrides
from vid2vid.eval.feature_nets import load_feature_net, save_random_weights

SIZES = {"i3d": 224, "resnext101": 112}  # each net's input side in the eval service



def main(argv: list[str]) -> None:
    o = parse_overrides(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch, repeats, frames = int(o.get("batch", 32 if device.type == "cuda" else 2)), int(o.get("repeats", 3)), int(
        o.get("frames", 16))
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    print(f"device {device}, batch {batch} clips of {frames} frames")
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for name, side in SIZES.items():
            side = int(o.get("size", side))
            net = load_feature_net(name, save_random_weights(name, Path(tmp) / f"{name}.pt"), device)
            x = torch.rand(batch, 3, frames, side, side, device=device) * 2 - 1
            rate, feats = {}, {}
            for p in precisions:
                ctx = (lambda: torch.autocast("cuda", torch.bfloat16)) if p == "bf16" else contextlib.nullcontext

                def run(ctx=ctx, p=p, net=net, x=x, feats=feats):
                    with ctx():
                        feats[p] = net.extract(x).float()

                rate[p] = batch / timed(run, repeats)
                print(f"{name:10s} [{p}] {rate[p]:8.1f} clips/s  ({side}x{side})")
            if len(rate) == 2:
                drift = ((feats["bf16"] - feats["fp32"]).norm() / feats["fp32"].norm()).item()
                print(f"{name:10s} bf16 / fp32 speed-up {rate['bf16'] / rate['fp32']:.2f}x, "
                      f"feature drift {drift:.2e} (relative L2)")


if __name__ == "__main__":
    main(sys.argv[1:])
