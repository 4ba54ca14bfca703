"""Sequential inference for videos of any length in constant memory (``vid2vid generate``).

:class:`StreamingGenerator` is :func:`vid2vid.models.vid2vid.generate_sequence` one frame at a time:
the last ``n_frames_G`` encoded source frames and the last ``L`` generated frames sit in fixed-size
ring buffers, the first frame comes from G's own no-previous-frame path, and nothing else is kept.
Inputs stream from disk (:mod:`vid2vid.generate.inputs`) and the mp4 is encoded as frames come
(:class:`vid2vid.media.VideoWriter`), so 1,200 frames need the memory of 60.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from vid2vid.checkpoints import load_generator
from vid2vid.config import ModelConfig
from vid2vid.generate.inputs import SourceFrame, open_input
from vid2vid.generate.relabel import class_id, parse_relabel, relabel_table
from vid2vid.generate.styles import STYLES_FILE, StyleBank, StyleSampler
from vid2vid.media import VideoWriter, side_by_side, source_picture, to_uint8
from vid2vid.models.inputs import encode_source
from vid2vid.storage import local_path


@dataclass
class GenerateArgs:
    """``vid2vid generate`` options (``key=value``)."""

    checkpoint: str  # training checkpoint folder (config.json + generator/weights.pt)
    input: str  # label folder | video file | shard folder (with manifest.json)
    out: str  # output .mp4
    side_by_side: bool = False  # also write <out>.side_by_side.mp4: source | output
    png_dir: str | None = None  # also write every output frame as PNG here
    relabel: str = ""  # e.g. building:vegetation,vegetation:building (names or ids)
    style_seed: int | None = None  # draw one style per object (needs model.use_features)
    style_class: str | None = None  # re-draw only this class with style_seed
    base_style_seed: int | None = None  # seed of every other class when style_class is set
    styles: str | None = None  # mixtures file; default <checkpoint>/styles.npz
    max_frames: int = 0  # 0 = the whole input
    fps: float = 15.0
    instances: str | None = None  # instance-map folder for a label-folder input
    split: str | None = None  # shard input: split (default test, else the first)
    sequence: str | None = None  # shard input: sequence (default the first)
    device: str = "cpu"
    progress: bool = True


@dataclass
class GenerateResult:
    out: Path
    side_by_side: Path | None
    png_dir: Path | None
    frames: int
    seconds: float

    @property
    def frames_per_second(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0


class StreamingGenerator:
    """Feeds G one source frame at a time, exactly as ``generate_sequence`` does for a whole clip."""

    def __init__(self, gen: torch.nn.Module, cfg: ModelConfig, device: str | torch.device = "cpu"):
        self.gen, self.cfg, self.device = gen, cfg, torch.device(device)
        self.sources: deque[Tensor] = deque(maxlen=cfg.n_frames_G)
        self.features: deque[Tensor] = deque(maxlen=cfg.n_frames_G)
        self.previous: deque[Tensor] = deque(maxlen=cfg.prev_frames)

    def reset(self) -> None:
        """Start a new sequence: the next frame comes from the no-previous-frame path again."""
        self.sources.clear()
        self.features.clear()
        self.previous.clear()

    @staticmethod
    def _window(buf: deque[Tensor], length: int) -> Tensor:
        """(1, length, ...) of the buffered frames, the earliest repeated until ``length`` exist."""
        items = list(buf)
        return torch.stack([items[0]] * (length - len(items)) + items, dim=1)

    @torch.inference_mode()
    def step(self, frame: SourceFrame, features: np.ndarray | None = None) -> Tensor:
        """Generate the next frame: (3, H, W) in [-1, 1]."""
        cfg, dev = self.cfg, self.device
        semantic = cfg.label_nc > 0
        # torch.tensor copies: shard arrays are read-only Arrow views
        labels = torch.tensor(frame.labels, dtype=torch.long if semantic else torch.float32, device=dev)
        edges = torch.tensor(frame.instance_edges, dtype=torch.float32, device=dev)
        src = encode_source(labels[None, None], edges[None, None] if cfg.use_instance else None, cfg)
        self.sources.append(src[:, 0])
        if cfg.use_features:
            if features is None:
                raise ValueError("StreamingGenerator: model.use_features needs a feature map per frame")
            self.features.append(torch.from_numpy(features).to(dev)[None])
        prev = self._window(self.previous, cfg.prev_frames) if self.previous else None
        out = self.gen(self._window(self.sources, cfg.n_frames_G), prev, labels[None] if semantic else None,
                       self._window(self.features, cfg.n_frames_G) if cfg.use_features else None)
        self.previous.append(out.frame)
        return out.frame[0]


class FrameSink:
    """Where generated frames go: the mp4, optionally a side-by-side mp4 and PNG files."""

    def __init__(self, out: str | Path, label_nc: int, fps: float = 15.0, side: bool = False,
                 png_dir: str | Path | None = None):
        self.out = Path(out)
        if self.out.suffix.lower() != ".mp4":
            raise ValueError(f"out={out}: the output must be an .mp4 file")
        self.label_nc = label_nc
        self.video = VideoWriter(self.out, fps)
        self.side_path = self.out.with_suffix(".side_by_side.mp4") if side else None
        self.side = VideoWriter(self.side_path, fps) if side else None
        self.png_dir = Path(png_dir) if png_dir else None
        if self.png_dir:
            self.png_dir.mkdir(parents=True, exist_ok=True)
        self.frames = 0

    def write(self, source: SourceFrame, frame: Tensor) -> None:
        image = to_uint8(frame)
        self.video.write(image)
        if self.side is not None:
            self.side.write(side_by_side(source_picture(torch.from_numpy(np.asarray(source.labels)),
                                                        self.label_nc), image))
        if self.png_dir is not None:
            from PIL import Image

            Image.fromarray(image).save(self.png_dir / f"{self.frames:06d}.png")
        self.frames += 1

    def close(self) -> None:
        self.video.close()
        if self.side is not None:
            self.side.close()


def render(streamer: StreamingGenerator, frames: Iterable[SourceFrame], sink: FrameSink,
           sampler: StyleSampler | None = None, total: int | None = None, progress: bool = True) -> int:
    """Generate and write every frame of ``frames``; returns the number written."""
    from tqdm import tqdm

    n = 0
    # disable=None: a bar on a terminal only; piped or logged, it would print a line per update
    with tqdm(total=total, unit="frame", desc="generate", disable=None if progress else True) as bar:
        for frame in frames:
            feats = None if sampler is None else sampler.features(frame.labels, frame.instances)
            sink.write(frame, streamer.step(frame, feats))
            n += 1
            bar.update(1)
    return n


def load_model(checkpoint: str | Path, device: str = "cpu"):
    """(config, generator side in eval mode) of a checkpoint, checked against its own resolution."""
    cfg, gen = load_generator(checkpoint, device)
    w, h = cfg.data.size
    m = gen.generator.size_multiple
    if w % m or h % m:
        raise ValueError(f"{checkpoint}: data.resolution {cfg.data.resolution} is not a multiple of {m}, "
                         "which the generator's downsampling needs")
    return cfg, gen


def make_sampler(checkpoint: str | Path, model: ModelConfig, styles: str | None, seed: int | None,
                 style_class: str | None, base_seed: int | None) -> StyleSampler | None:
    """The style sampler a feature model needs (None for a model without E); errors name the fix."""
    if not model.use_features:
        if seed is not None or style_class is not None or base_seed is not None:
            raise ValueError(f"{checkpoint}: trained without model.use_features; style_seed/style_class "
                             "need a model with the feature encoder E")
        return None
    bank = StyleBank.load(styles or local_path(checkpoint, "checkpoint= (it holds styles.pt; or give styles=)")
                          / STYLES_FILE)
    if bank.feat_num != model.feat_num:
        raise ValueError(f"styles: mixtures of {bank.feat_num}-d features, the model takes {model.feat_num}")
    cls = None if style_class is None else class_id(style_class, model.label_nc, "style_class")
    return StyleSampler(bank, seed, cls, base_seed)


def _limit(frames: Iterable[SourceFrame], n: int) -> Iterable[SourceFrame]:
    for i, f in enumerate(frames):
        if n and i >= n:
            return
        yield f


def generate(args: GenerateArgs) -> GenerateResult:
    """Checkpoint + source sequence -> mp4 (and optional side-by-side video and PNG frames)."""
    cfg, gen = load_model(args.checkpoint, args.device)
    model = cfg.model
    sampler = make_sampler(args.checkpoint, model, args.styles, args.style_seed, args.style_class,
                           args.base_style_seed)
    reader = open_input(args.input, cfg.data.size, model.label_nc, model.input_nc, instance_dir=args.instances,
                        split=args.split, sequence=args.sequence, canny=(cfg.data.canny_low, cfg.data.canny_high))
    frames: Iterable[SourceFrame] = reader
    if args.relabel:
        lut = relabel_table(parse_relabel(args.relabel, model.label_nc))
        frames = (f.relabeled(lut) for f in frames)
    total = min(len(reader), args.max_frames) if args.max_frames else len(reader)
    sink = FrameSink(args.out, model.label_nc, args.fps, args.side_by_side, args.png_dir)
    t0 = time.perf_counter()
    try:
        n = render(StreamingGenerator(gen, model, args.device), _limit(frames, args.max_frames), sink, sampler,
                   total, args.progress)
    finally:
        sink.close()
    return GenerateResult(sink.out, sink.side_path, sink.png_dir, n, time.perf_counter() - t0)
