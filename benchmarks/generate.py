"""Generation benchmarks: constant memory of long videos (the default), and raw speed on a device.

``mode=memory`` (default): frames/s and peak RSS for 600 vs 60 frames, one run.

Writes a tiny checkpoint (the smoke preset with ``model.ngf=8``, random weights: speed and memory do
not depend on the weights) and a folder of 256x128 street label maps with a car driving across, then
generates N frames at the checkpoint's 128x64 for each N, each in a FRESH subprocess whose own peak
RSS (``VmHWM`` from /proc/self/status) it reports, so one run's memory cannot hide in another's.
Acceptance (issue 8): the peak for 600 frames is within 5% of the peak for 60.

    .venv/bin/python benchmarks/generate.py
    .venv/bin/python benchmarks/generate.py frames=60,600,1200 threads=2 model.ngf=16

``frames`` and ``threads`` are read here; any other ``key=value`` overrides the checkpoint's config.

``mode=speed``: the generator of any preset (random weights: speed does not depend on them) at any size
on any device, frames streamed exactly as ``vid2vid generate`` feeds them (``StreamingGenerator``),
decoding and mp4 encoding left out so the number is the generator's. Prints frames/s, peak device
memory, FLOPs per frame (torch's FlopCounterMode) and the achieved TFLOP/s; then each speed lever in
``levers`` (channels_last, compile = torch.compile, cudagraphs = torch.compile's CUDA graphs), each
checked against the fp32 output of the same frames (mean |error| <= ``tol``) and kept only if faster:

    python benchmarks/generate.py mode=speed preset=cityscapes_2048 device=cuda precision=bf16 frames=60 \
        levers=channels_last,compile,cudagraphs
    .venv/bin/python benchmarks/generate.py mode=speed preset=smoke device=cpu precision=fp32 frames=8
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def child(ckpt: str, labels: str, out: str, frames: int, threads: int) -> None:
    import torch

    from vid2vid.generate.inference import GenerateArgs, generate

    torch.set_num_threads(threads)
    r = generate(GenerateArgs(ckpt, labels, out, max_frames=frames, progress=False))
    print(json.dumps({"frames": r.frames, "seconds": r.seconds, "fps": r.frames_per_second,
                      "peak_rss_mb": peak_rss_mb()}))


def write_labels(folder: Path, n: int, size=(256, 128)) -> None:
    from PIL import Image

    w, h = size
    folder.mkdir(parents=True)
    for t in range(n):
        a = np.full((h, w), 7, np.uint8)  # road
        a[: h // 3] = 23  # sky
        a[h // 3: h // 2, : w // 2], a[h // 3: h // 2, w // 2:] = 11, 21  # building | vegetation
        x = (3 * t) % (w - 40)
        a[h // 2: h // 2 + 20, x: x + 40] = 26  # a car driving across, again and again
        Image.fromarray(a).save(folder / f"{t:06d}.png")


def main(argv: list[str]) -> int:
    opts = dict(a.split("=", 1) for a in argv)
    if opts.pop("mode", "memory") == "speed":
        from generate_speed import speed

        return speed(opts)
    return memory(opts)


def memory(opts: dict[str, str]) -> int:
    import torch

    from vid2vid.config import load_config, to_dict
    from vid2vid.models.vid2vid import GeneratorSide

    counts = [int(n) for n in opts.pop("frames", "60,600").split(",")]
    threads = int(opts.pop("threads", "1"))
    cfg = load_config(["preset=smoke", "model.ngf=8", *(f"{k}={v}" for k, v in opts.items())])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "ckpt"
        (ckpt / "generator").mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps(to_dict(cfg)))
        torch.save(GeneratorSide(cfg.model).state_dict(), ckpt / "generator" / "weights.pt")
        write_labels(Path(tmp) / "labels", max(counts))
        print(f"model: smoke preset, ngf={cfg.model.ngf}, {cfg.data.resolution}, torch threads {threads}")
        results = {}
        for n in counts:
            proc = subprocess.run([sys.executable, __file__, "--child", str(ckpt), f"{tmp}/labels",
                                   f"{tmp}/out{n}.mp4", str(n), str(threads)],
                                  capture_output=True, text=True, check=True)
            results[n] = r = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{r['frames']:>5} frames: {r['fps']:6.2f} frames/s ({r['seconds']:.1f}s), "
                  f"peak RSS {r['peak_rss_mb']:.1f} MB")
    lo, hi = min(counts), max(counts)
    ratio = results[hi]["peak_rss_mb"] / results[lo]["peak_rss_mb"]
    ok = abs(ratio - 1) <= 0.05
    print(f"peak RSS {hi} / {lo} frames = {ratio:.3f} -> {'PASS' if ok else 'FAIL'} (within 5%)")
    from timing import print_ratio  # benchmarks/ is this script's folder, first on sys.path

    print_ratio(f"generate_peak_rss_{hi}_vs_{lo}", ratio, "<= 1.05")
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main(sys.argv[1:]))
