"""Future video prediction (paper §4) as the paper decomposes it: predict future label maps from past
ones, then let vid2vid render them.

:class:`LabelPredictor` is deliberately a small BASELINE, not the paper's predictor (which the paper
does not specify): a two-level conv net over the one-hot maps of the last K frames, trained with
per-pixel cross-entropy on the next map, plus a learned "persistence" term that adds the last map's
one-hot to the logits, so it starts as "nothing moves" and only learns corrections. Rolled out
autoregressively it blurs motion into argmax noise after a few frames; treat its output as a demo
of the pipeline and a floor to beat.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vid2vid.models.inputs import one_hot_labels


@dataclass
class PredictorConfig:
    label_nc: int
    context: int = 2  # K past label maps in, one map out
    width: int = 32
    resolution: str = ""  # WxH of the shards it was trained on (informative: the net is convolutional)


def _conv(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, padding=dilation, dilation=dilation), nn.ReLU())


class LabelPredictor(nn.Module):
    """(N, K, H, W) past label ids -> (N, label_nc, H, W) logits of the next label map."""

    def __init__(self, cfg: PredictorConfig):
        super().__init__()
        if cfg.label_nc < 2 or cfg.context < 1:
            raise ValueError(f"LabelPredictor: needs label_nc >= 2 and context >= 1, got {cfg}")
        self.cfg = cfg
        w = cfg.width
        self.inp = _conv(cfg.context * cfg.label_nc, w)
        self.down = _conv(w, 2 * w, stride=2)
        self.mid = nn.Sequential(_conv(2 * w, 2 * w, dilation=2), _conv(2 * w, 2 * w, dilation=4))
        self.up = _conv(2 * w, w)
        self.out = nn.Conv2d(2 * w, cfg.label_nc, 3, padding=1)
        self.persistence = nn.Parameter(torch.tensor(4.0))

    def forward(self, past: Tensor) -> Tensor:
        n, k, h, w = past.shape
        if k != self.cfg.context:
            raise ValueError(f"LabelPredictor: expected {self.cfg.context} past maps, got {k}")
        onehot = one_hot_labels(past, self.cfg.label_nc)  # (N, K, C, H, W)
        skip = self.inp(onehot.flatten(1, 2))
        x = self.mid(self.down(skip))
        x = self.up(F.interpolate(x, size=(h, w), mode="nearest"))
        return self.out(torch.cat([x, skip], 1)) + self.persistence * onehot[:, -1]


def save_predictor(model: LabelPredictor, path: str | Path, **info) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"config": asdict(model.cfg), "state_dict": model.state_dict(), **info}, path)
    return path


def load_predictor(path: str | Path) -> LabelPredictor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no predictor; train one with `vid2vid predict-train shards=... out=...`")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or "config" not in blob or "state_dict" not in blob:
        raise ValueError(f"{path}: not a label predictor file (no config/state_dict)")
    model = LabelPredictor(PredictorConfig(**blob["config"]))
    model.load_state_dict(blob["state_dict"])
    return model.eval()


# ------------------------------------------------------------------------------------------------
# training


@dataclass
class PredictTrainArgs:
    """``vid2vid predict-train`` options."""

    shards: str
    out: str  # predictor file (.pt)
    context: int = 2
    steps: int = 200
    lr: float = 1e-3
    width: int = 32
    windows: int = 8  # (K past, next) windows per step, drawn from one clip
    split: str = "train"
    seed: int = 0


@dataclass
class PredictTrainResult:
    path: Path
    steps: int
    losses: list[float] = field(default_factory=list)


def clip_windows(labels: Tensor, context: int) -> tuple[Tensor, Tensor]:
    """(T, H, W) ids -> past (T-K, K, H, W) and next (T-K, H, W): every window of the clip."""
    t = labels.shape[0]
    past = torch.stack([labels[i:i + context] for i in range(t - context)])
    return past, labels[context:]


def _cycle_clips(shards: str, split: str) -> Iterator:
    from vid2vid.datasets.shards import iter_clips

    while True:  # epochs over the shards, one clip in memory at a time
        empty = True
        for clip in iter_clips(shards, split):
            empty = False
            yield clip
        if empty:
            raise ValueError(f"{shards}: split {split!r} has no clips")


def train_predictor(args: PredictTrainArgs) -> PredictTrainResult:
    """Train the baseline predictor for ``args.steps`` Adam steps on label maps of the shards (no Ray)."""
    from vid2vid.datasets.shards import load_manifest

    manifest = load_manifest(args.shards)
    label_nc, clip_len = int(manifest["label_nc"]), int(manifest["clip_len"])
    if label_nc == 0:
        raise ValueError(f"{args.shards}: the shards hold edge maps (label_nc 0); the predictor needs label ids")
    if clip_len <= args.context:
        raise ValueError(f"{args.shards}: clips of {clip_len} frames leave no target after context={args.context}")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    w, h = manifest["resolution"]
    model = LabelPredictor(PredictorConfig(label_nc, args.context, args.width, f"{w}x{h}"))
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    losses = []
    for _, clip in zip(range(args.steps), _cycle_clips(args.shards, args.split), strict=False):
        past, target = clip_windows(clip.labels[0], args.context)
        pick = torch.randperm(len(target), generator=gen)[:args.windows]
        loss = F.cross_entropy(model(past[pick]), target[pick])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    path = save_predictor(model.eval(), args.out, steps=len(losses), losses=losses, shards=str(args.shards))
    return PredictTrainResult(path, len(losses), losses)


# ------------------------------------------------------------------------------------------------
# prediction


@torch.inference_mode()
def rollout(model: LabelPredictor, context: list[np.ndarray], future: int) -> Iterator[np.ndarray]:
    """Predict ``future`` label maps after ``context`` (K maps (H, W)), each fed back as input."""
    k = model.cfg.context
    if len(context) != k:
        raise ValueError(f"rollout: the predictor takes {k} context maps, got {len(context)}")
    past = deque((torch.tensor(np.asarray(c), dtype=torch.long) for c in context), maxlen=k)
    for _ in range(future):
        nxt = model(torch.stack(list(past))[None]).argmax(1)[0]
        past.append(nxt)
        yield nxt.to(torch.uint8).numpy()


@dataclass
class PredictArgs:
    """``vid2vid predict`` options."""

    checkpoint: str  # vid2vid training checkpoint that renders the label maps
    predictor: str  # predictor file from predict-train
    input: str  # label folder | shard folder: the observed frames
    out: str
    context: int = 0  # 0 = the predictor's own K
    future: int = 30
    start: int = 0  # first observed frame of the input
    include_context: bool = True  # the video shows the K observed frames, then the predicted ones
    side_by_side: bool = False
    fps: float = 15.0
    instances: str | None = None
    split: str | None = None
    sequence: str | None = None
    device: str = "cpu"
    progress: bool = True


@dataclass
class PredictResult:
    out: Path
    side_by_side: Path | None
    observed: int
    predicted: int
    seconds: float


def predict(args: PredictArgs) -> PredictResult:
    """Observed label maps -> predicted future label maps -> vid2vid video (observed part first)."""
    from tqdm import tqdm

    from vid2vid.generate.inference import FrameSink, StreamingGenerator, load_model, make_sampler
    from vid2vid.generate.inputs import frame_from_labels, open_input

    cfg, gen = load_model(args.checkpoint, args.device)
    model_cfg = cfg.model
    predictor = load_predictor(args.predictor)
    k = predictor.cfg.context
    if args.context not in (0, k):
        raise ValueError(f"context={args.context}: {args.predictor} was trained with context {k}")
    if predictor.cfg.label_nc != model_cfg.label_nc:
        raise ValueError(f"{args.predictor}: predicts {predictor.cfg.label_nc} classes, the vid2vid model "
                         f"takes label_nc {model_cfg.label_nc}")
    reader = open_input(args.input, cfg.data.size, model_cfg.label_nc, model_cfg.input_nc,
                        instance_dir=args.instances, split=args.split, sequence=args.sequence)
    observed = list(itertools.islice(iter(reader), args.start, args.start + k))  # K frames only
    if len(observed) < k:
        raise ValueError(f"{args.input}: has {len(reader)} frames, fewer than start={args.start} + context {k}")
    sampler = make_sampler(args.checkpoint, model_cfg, None, None, None, None)
    streamer = StreamingGenerator(gen, model_cfg, args.device)
    sink = FrameSink(args.out, model_cfg.label_nc, args.fps, args.side_by_side)
    future = (frame_from_labels(m, f"predicted#{i}") for i, m in
              enumerate(rollout(predictor, [f.labels for f in observed], args.future)))
    t0 = time.perf_counter()
    try:
        with tqdm(total=k + args.future, unit="frame", desc="predict", disable=None if args.progress else True) as bar:
            for i, frame in enumerate(itertools.chain(observed, future)):
                feats = None if sampler is None else sampler.features(frame.labels, frame.instances)
                image = streamer.step(frame, feats)  # observed frames also warm the L=2 window
                if i >= k or args.include_context:
                    sink.write(frame, image)
                bar.update(1)
    finally:
        sink.close()
    return PredictResult(sink.out, sink.side_path, k if args.include_context else 0, args.future,
                         time.perf_counter() - t0)
