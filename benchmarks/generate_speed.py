"""``benchmarks/generate.py mode=speed``: the generator's frames/s on a device, and the levers tried on it.

Frames are synthetic street label maps at the requested size, built before timing; each is fed through
:class:`vid2vid.generate.inference.StreamingGenerator` (the ``vid2vid generate`` path: source encoding,
ring buffers, the first frame from G's no-previous-frame path). Timing covers ``frames`` frames after
``warmup`` frames and waits for the device. Memory is the device's peak allocation (CUDA) or the
process's peak RSS (CPU).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vid2vid.config import load_config
from vid2vid.datasets.labels import instance_edges
from vid2vid.datasets.synthetic import make_sequence
from vid2vid.generate.inference import StreamingGenerator
from vid2vid.generate.inputs import SourceFrame
from vid2vid.models.vid2vid import GeneratorSide

LEVERS = ("channels_last", "compile", "cudagraphs")


@dataclass
class Measurement:
    name: str
    fps: float
    peak_gib: float
    mean_abs_err: float  # against the fp32 baseline's frames (0 for the baseline itself)


def source_frames(width: int, height: int, count: int) -> list[SourceFrame]:
    """Synthetic street scenes (moving cars) as the generator's inputs, made once before timing."""
    seq = make_sequence(min(count, 32), width, height, seed=0)
    frames = []
    for t in range(count):
        labels = seq.labels[t % len(seq.labels)].astype(np.uint8)
        inst = seq.instances[t % len(seq.instances)].astype(np.int64)
        frames.append(SourceFrame(labels, inst, instance_edges(inst), f"{t:06d}"))
    return frames


def build(cfg, device: torch.device, levers: tuple[str, ...]) -> torch.nn.Module:
    torch.manual_seed(0)
    gen = GeneratorSide(cfg.model).to(device).eval()
    if "channels_last" in levers:
        gen = gen.to(memory_format=torch.channels_last)
    if "compile" in levers or "cudagraphs" in levers:
        mode = "reduce-overhead" if "cudagraphs" in levers else "max-autotune-no-cudagraphs"
        gen.generator = torch.compile(gen.generator, mode=mode, dynamic=False)
    return gen


def run(gen, cfg, frames: list[SourceFrame], device: torch.device, precision: str) -> list[torch.Tensor]:
    streamer = StreamingGenerator(gen, cfg.model, device)
    autocast = (torch.autocast(device_type=device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    outs = []
    with autocast:
        for f in frames:
            outs.append(streamer.step(f))
    return outs


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def measure(name, cfg, frames, device, precision, levers, reference, warmup) -> Measurement:
    gen = build(cfg, device, levers)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    check = run(gen, cfg, frames[: len(reference)], device, precision)  # also compiles / captures
    run(gen, cfg, frames[:warmup], device, precision)
    sync(device)
    t0 = time.perf_counter()
    run(gen, cfg, frames, device, precision)
    sync(device)
    seconds = time.perf_counter() - t0
    err = float(torch.stack([(a.float() - b.float()).abs().mean() for a, b in zip(check, reference, strict=True)])
                .mean())
    return Measurement(name, len(frames) / seconds, peak_gib(device), err)


def flops_per_frame(cfg, frames, device) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    gen = build(cfg, device, ())
    run(gen, cfg, frames[:2], device, "fp32")  # the second frame takes the warp path every later frame takes
    streamer = StreamingGenerator(gen, cfg.model, device)
    streamer.step(frames[0])
    with FlopCounterMode(display=False) as counter:
        streamer.step(frames[1])
    return float(counter.get_total_flops())


def speed(opts: dict[str, str]) -> int:
    preset = opts.pop("preset", "cityscapes_2048")
    device = torch.device(opts.pop("device", "cuda" if torch.cuda.is_available() else "cpu"))
    precision = opts.pop("precision", "bf16" if device.type == "cuda" else "fp32")
    count, warmup = int(opts.pop("frames", "60")), int(opts.pop("warmup", "5"))
    levers = tuple(x for x in opts.pop("levers", "").split(",") if x)
    tol = float(opts.pop("tol", "0.02"))
    unknown = [lv for lv in levers if lv not in LEVERS]
    if unknown:
        raise SystemExit(f"levers: unknown {unknown}; choose from {list(LEVERS)}")
    cfg = load_config([f"preset={preset}", *(f"{k}={v}" for k, v in opts.items())])
    width, height = cfg.data.size
    frames = source_frames(width, height, count)
    torch.backends.cudnn.benchmark = True
    print(f"generator of preset {preset}: {width}x{height}, {device}, {precision}, {count} frames after "
          f"{warmup} warm-up, torch {torch.__version__}, threads {torch.get_num_threads()}")
    flops = flops_per_frame(cfg, frames, device)
    print(f"FLOPs per frame (convolutions and matmuls, FlopCounterMode): {flops / 1e9:.1f} GFLOP")
    reference = run(build(cfg, device, ()), cfg, frames[:4], device, "fp32")
    results = [measure("baseline", cfg, frames, device, precision, (), reference, warmup)]
    kept: tuple[str, ...] = ()
    for lever in levers:
        trial = (*kept, lever)
        m = measure("+".join(trial), cfg, frames, device, precision, trial, reference, warmup)
        results.append(m)
        best = max((r for r in results if r.mean_abs_err <= tol), key=lambda r: r.fps)
        if best is m:
            kept = trial
    for r in results:
        ok = "ok" if r.mean_abs_err <= tol else f"REJECTED (> {tol})"
        print(f"{r.name:<32} {r.fps:8.2f} frames/s  {r.fps * flops / 1e12:9.3f} TFLOP/s  peak {r.peak_gib:6.2f} GiB"
              f"  mean |err| vs fp32 {r.mean_abs_err:.4f} {ok}")
    best = max((r for r in results if r.mean_abs_err <= tol), key=lambda r: r.fps)
    print(f"best: {best.name}: {best.fps:.2f} frames/s, {best.fps * flops / 1e12:.3f} TFLOP/s")
    print(f"ratio generate_fps_vs_goal: {best.fps / 30:.2f} (bar 1.0 = 30 frames/s)")
    return 0
