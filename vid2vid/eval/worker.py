"""The evaluation actor: one Ray Data UDF that generates a batch of clips and measures all of it.

Each actor of the pool loads the generator and every feature net once, then per batch of segments:
reads them from the shards, generates them (with sampled styles and/or E's reconstruction for a
multimodal model), computes each feature metric's features of the generated clips (and of the real
ones whose statistics are not cached yet), the warping errors and the tOF terms, and returns only
those numbers: no frames leave the actor. One fused stage instead of a pool per net: on a CPU box the
actors are data parallel, each on its own core, with nothing crossing the object store; on a GPU box
each actor holds its GPU for all of a clip's work.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vid2vid.eval.clips import (
    generate_clip,
    read_segment,
    stack_clips,
    stored_flow_valid,
    style_features,
    to_uint8_frames,
)
from vid2vid.eval.metric_utils import FAKE, REAL, RECON, FeatureExtractor
from vid2vid.eval.metrics import FEATURE_METRICS, TEMPORAL_COLUMNS, TEMPORAL_FAMILIES
from vid2vid.eval.metrics.spec import ClipSample
from vid2vid.eval.temporal import backward_flows
from vid2vid.weights import WeightsSource, fetch, sha256_file

log = logging.getLogger("vid2vid.eval")

@dataclass(frozen=True)
class WeightsRef:
    """A feature net's weights as the driver resolved them: its local file, and (for ``auto`` and URL
    settings) the source an actor on another node downloads into its own cache, checked to be the
    same bytes (``sha256``)."""

    path: str
    sha256: str
    source: WeightsSource | None = None

    def local(self) -> str:
        if Path(self.path).is_file():
            return self.path
        if self.source is None:
            raise FileNotFoundError(f"{self.path}: weights file not found on this node; put it on storage "
                                    f"every node sees, or use the setting's auto/URL form")
        path = fetch(self.source)
        got = sha256_file(path)
        if got != self.sha256:
            raise ValueError(f"{path}: sha256 {got} differs from {self.sha256}, the file the driver evaluated "
                             f"with ({self.path})")
        return str(path)


@dataclass(frozen=True)
class TofFlow:
    method: str  # "dis" or "raft"
    weights: str | None  # RAFT-small weights
    real_from_shards: bool  # the shards' flows were estimated with this estimator: reuse them


@dataclass
class WorkerSpec:
    """Everything an actor needs (pickled once per actor)."""

    checkpoint_dir: str
    weights: dict[str, WeightsRef]  # net -> weights
    metrics: list[str]  # Fréchet metrics (metrics.FEATURE_METRICS)
    real_metrics: list[str]  # metrics whose real statistics are not cached yet
    sizes: dict[str, int]
    fid_frame: str
    kinds: list[str]  # FAKE and/or RECON
    styles_path: str | None  # per-class mixtures for FAKE rows of a multimodal model
    style_seed: int
    tof: TofFlow | None
    threads: int = 1
    expect_random: dict[str, bool] = field(default_factory=dict)  # net -> the driver saw a random-weights file


def style_seed_of(base: int, index: int) -> int:
    """The style draw of clip ``index``: fixed per clip, so every checkpoint meets the same appearances."""
    return base * 1_000_003 + int(index)


class EvaluateClips:
    """Ray Data UDF: ``{"index", "segment"}`` rows -> one row per (clip, kind) with each Fréchet
    metric's feature column and ``<metric>_valid``, and on generated rows each temporal family's
    columns (``metrics.TEMPORAL_COLUMNS``: 0 on real rows)."""

    def __init__(self, spec: WorkerSpec):
        from vid2vid.checkpoints import load_generator

        started = time.perf_counter()
        torch.set_num_threads(max(1, spec.threads))
        self.spec = spec
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.cfg, self.gen = load_generator(spec.checkpoint_dir, self.device)
        self.bank = None
        if spec.styles_path and FAKE in spec.kinds:
            from vid2vid.generate.styles import StyleBank

            self.bank = StyleBank.load(spec.styles_path)
        self.features = None
        if spec.metrics:
            paths = {net: ref.local() for net, ref in spec.weights.items()}
            self.features = FeatureExtractor(paths, spec.metrics, spec.sizes, spec.fid_frame, self.device)
            if self.features.random_weights != {n: spec.expect_random.get(n, False) for n in self.features.nets}:
                raise RuntimeError("random-weights marker of a feature net changed during evaluation")
        self.flow = None
        if spec.tof is not None:
            import cv2

            from vid2vid.datasets.flow import FlowEstimator

            cv2.setNumThreads(max(1, spec.threads))
            self.flow = FlowEstimator(spec.tof.method, spec.tof.weights)
        self.startup_s = time.perf_counter() - started  # loading: a fixed cost, reported once per actor

    def _generate(self, clip, dev, kind: str, indices) -> torch.Tensor:
        model = self.cfg.model
        feats = None
        if model.use_features and kind == RECON:
            feats = self.gen.encode_features(dev.frames, dev.labels, dev.instances)
        elif model.use_features:
            feats = torch.cat([style_features(self.bank, clip, i, style_seed_of(self.spec.style_seed, idx))
                               for i, idx in enumerate(indices)]).to(self.device)
        return generate_clip(self.gen, model, dev, feats).cpu()

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        segments = [str(s) for s in batch["segment"]]
        indices = [int(i) for i in batch["index"]]
        clip = stack_clips([read_segment(s) for s in segments])
        dev = clip.to(self.device)
        rows: dict[str, list] = defaultdict(list)
        real_u8 = to_uint8_frames(clip.frames)
        real_flows = self._real_flows(clip, real_u8, segments)
        for kind in self.spec.kinds:
            fake = self._generate(clip, dev, kind, indices)
            fake_u8 = to_uint8_frames(fake)
            feats = self.features(fake_u8) if self.features else {}
            for i, index in enumerate(indices):
                sample = ClipSample(fake, clip, i, fake_u8[i], *real_flows[i], self.flow)
                terms = {k: v for family in TEMPORAL_FAMILIES for k, v in family.measure(sample).items()}
                self._row(rows, index, kind, {m: v[i] for m, v in feats.items()}, **terms)
        if self.spec.real_metrics and self.features:
            feats = self.features(real_u8, self.spec.real_metrics)
            for i, index in enumerate(indices):
                self._row(rows, index, REAL, {m: v[i] for m, v in feats.items()})
        rows["startup_s"] = [self.startup_s] + [0.0] * (len(rows["index"]) - 1)
        self.startup_s = 0.0
        return {k: np.stack(v) if k in FEATURE_METRICS else np.asarray(v) for k, v in rows.items()}

    def _real_flows(self, clip, real_u8: np.ndarray, segments: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per clip (backward flows (T, H, W, 2), valid (T,)) of the real frames, for tOF."""
        if self.flow is None:
            return [(None, None)] * len(segments)
        out = []
        for i, seg in enumerate(segments):
            if self.spec.tof.real_from_shards:
                out.append((clip.flow[i].permute(0, 2, 3, 1).numpy(), stored_flow_valid(seg)))
            else:
                valid = np.ones(len(real_u8[i]), bool)
                valid[0] = False
                out.append((backward_flows(real_u8[i], self.flow), valid))
        return out

    def _row(self, rows: dict[str, list], index: int, kind: str, feats: dict[str, np.ndarray],
             **scalars: float) -> None:
        rows["index"].append(index)
        rows["kind"].append(kind)
        for m in self.spec.metrics:
            have = m in feats
            rows[m].append(feats[m] if have else np.zeros(FEATURE_METRICS[m].dim, np.float32))
            rows[f"{m}_valid"].append(have)
        for key in TEMPORAL_COLUMNS:
            rows[key].append(float(scalars.get(key, 0.0)))
