"""Multimodal synthesis (paper §3): per-class Gaussian mixtures over encoder E's instance features.

After training, E encodes REAL frames of the training shards; its map is averaged over every object
(class, instance id) of every frame, giving one ``feat_num``-vector per object per frame. One
``sklearn.mixture.GaussianMixture`` per class is fitted to those vectors and saved beside the
checkpoint as ``styles.npz`` (plain arrays, no pickle). At generation :class:`StyleSampler` draws one
vector per object from its class's mixture. The draw is seeded by (seed, class, instance id), so an
object keeps its vector in every frame it appears in (a stable appearance), and a class can be
re-drawn with a new seed while every other class keeps its vectors.

Objects are keyed by (class, instance id) rather than by instance id alone because stuff classes
(road, building, sky) usually share the "no instance" id: pooled by instance only, they would all get
one vector and no class could be restyled alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vid2vid.checkpoints import load_generator
from vid2vid.models.encoder import OBJECT_KEY, object_ids
from vid2vid.storage import local_path

STYLES_FILE = "styles.npz"
_KEY = OBJECT_KEY


@dataclass
class StyleBank:
    """Per-class mixtures, padded to the largest component count (padding has weight 0)."""

    classes: np.ndarray  # (C,) class ids
    weights: np.ndarray  # (C, K)
    means: np.ndarray  # (C, K, d)
    covariances: np.ndarray  # (C, K, d, d)
    counts: np.ndarray  # (C,) vectors each mixture was fitted on
    meta: dict

    @property
    def feat_num(self) -> int:
        return int(self.means.shape[-1])

    def row(self, cls: int) -> int | None:
        hit = np.flatnonzero(self.classes == cls)
        return int(hit[0]) if hit.size else None

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        np.savez(path, classes=self.classes, weights=self.weights, means=self.means,
                 covariances=self.covariances, counts=self.counts, meta=np.array(json.dumps(self.meta)))
        return path

    @classmethod
    def load(cls, path: str | Path) -> StyleBank:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no style mixtures; fit them first with "
                                    f"`vid2vid fit-styles checkpoint=<dir> shards=<training shards>`")
        with np.load(path, allow_pickle=False) as z:
            missing = {"classes", "weights", "means", "covariances", "counts", "meta"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a styles file, missing arrays {sorted(missing)}")
            return cls(z["classes"], z["weights"], z["means"], z["covariances"], z["counts"],
                       json.loads(str(z["meta"])))


# ------------------------------------------------------------------------------------------------
# fitting


def object_features(encoder: torch.nn.Module, frames: torch.Tensor, labels: torch.Tensor,
                    instances: torch.Tensor) -> list[tuple[np.ndarray, np.ndarray]]:
    """E's feature per object of each frame: frames (T,3,H,W), labels/instances (T,H,W) ->
    per frame (class ids (M,), vectors (M, d)), one row per (class, instance) present."""
    key = object_ids(labels, instances)
    with torch.no_grad():
        pooled = encoder(frames, key)  # (T, d, H, W), constant over each object
    out = []
    for t in range(frames.shape[0]):
        keys, first = np.unique(key[t].reshape(-1).numpy(), return_index=True)
        vecs = pooled[t].flatten(1)[:, torch.from_numpy(first)].T.numpy()
        out.append(((keys // _KEY).astype(np.int64), vecs.astype(np.float64)))
    return out


def _fit_one(x: np.ndarray, components: int, seed: int, reg: float):
    from sklearn.mixture import GaussianMixture

    d = x.shape[1]
    k = min(components, len(np.unique(x, axis=0)))
    if k < 2:  # one distinct vector: a narrow Gaussian at it
        return np.ones(1), x.mean(0, keepdims=True), (reg * np.eye(d))[None]
    gmm = GaussianMixture(k, covariance_type="full", reg_covar=reg, random_state=seed).fit(x)
    return gmm.weights_, gmm.means_, gmm.covariances_


@dataclass
class FitStylesResult:
    path: Path
    bank: StyleBank
    clips: int


def fit_styles(checkpoint: str | Path, shards: str | Path, split: str = "train", components: int = 5,
               max_clips: int = 0, max_per_class: int = 20000, seed: int = 0, reg_covar: float = 1e-4,
               out: str | Path | None = None) -> FitStylesResult:
    """Fit and save (default ``<checkpoint>/styles.npz``) one mixture per class seen in the shards."""
    from vid2vid.datasets.shards import iter_clips

    cfg, gen = load_generator(checkpoint)
    if gen.encoder is None:
        raise ValueError(f"{checkpoint}: trained without model.use_features, so there is no encoder E "
                         "and no styles to fit")
    vectors: dict[int, list[np.ndarray]] = {}
    counts: dict[int, int] = {}
    n = 0
    for clip in iter_clips(shards, split):
        if clip.frames is None:
            raise ValueError(f"{shards}: split {split!r} has no real frames; styles need real frames")
        for classes, vecs in object_features(gen.encoder, clip.frames[0], clip.labels[0], clip.instances[0]):
            for c in np.unique(classes):
                room = max_per_class - counts.get(int(c), 0)
                if room > 0:
                    sel = vecs[classes == c][:room]
                    vectors.setdefault(int(c), []).append(sel)
                    counts[int(c)] = counts.get(int(c), 0) + len(sel)
        n += 1
        if max_clips and n >= max_clips:
            break
    if not vectors:
        raise ValueError(f"{shards}: split {split!r} has no clips to fit styles on")
    fits = {c: _fit_one(np.concatenate(v), components, seed, reg_covar) for c, v in sorted(vectors.items())}
    K, d = max(len(w) for w, _, _ in fits.values()), cfg.model.feat_num
    C = len(fits)
    bank = StyleBank(np.array(sorted(fits), np.int64), np.zeros((C, K)), np.zeros((C, K, d)),
                     np.tile(np.eye(d), (C, K, 1, 1)), np.array([counts[c] for c in sorted(fits)], np.int64),
                     {"checkpoint": str(checkpoint), "shards": str(shards), "split": split, "clips": n,
                      "components": components, "seed": seed})
    for i, (w, m, cov) in enumerate(fits.values()):
        bank.weights[i, :len(w)], bank.means[i, :len(w)], bank.covariances[i, :len(w)] = w, m, cov
    path = bank.save(out or local_path(checkpoint, "checkpoint= (it receives styles.pt; or give out=)") / STYLES_FILE)
    return FitStylesResult(path, bank, n)


# ------------------------------------------------------------------------------------------------
# sampling


class StyleSampler:
    """One feature vector per object, drawn from its class's mixture and fixed for the whole video.

    ``seed=None``: every object takes its class's most likely appearance (the mean of its heaviest
    component), deterministic and the same for all objects of a class. ``seed=N``: each object's
    vector is drawn with a generator seeded by (N, class, instance id). ``style_class=c``: only class
    c is drawn with ``seed``; every other class is drawn with ``base_seed`` (None: its mean), i.e.
    exactly as in the video rendered without ``style_class``/``seed`` at ``base_seed``.
    Classes the mixtures never saw get the zero vector (E's tanh output is centred on 0).
    """

    def __init__(self, bank: StyleBank, seed: int | None = None, style_class: int | None = None,
                 base_seed: int | None = None):
        if style_class is not None and seed is None:
            raise ValueError("style_class needs style_seed: which draw should the class take?")
        self.bank, self.seed, self.style_class, self.base_seed = bank, seed, style_class, base_seed
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def _seed_for(self, cls: int) -> int | None:
        if self.style_class is None or cls == self.style_class:
            return self.seed
        return self.base_seed

    def vector(self, cls: int, inst: int) -> np.ndarray:
        key = (int(cls), int(inst))
        if key not in self._cache:
            if len(self._cache) > 65536:  # bounded: a very long video with ever new ids
                self._cache.clear()  # (recomputing is deterministic, so nothing changes)
            self._cache[key] = self._draw(*key)
        return self._cache[key]

    def _draw(self, cls: int, inst: int) -> np.ndarray:
        b = self.bank
        row = b.row(cls)
        if row is None:
            return np.zeros(b.feat_num)
        seed = self._seed_for(cls)
        if seed is None:
            return b.means[row, int(np.argmax(b.weights[row]))].copy()
        rng = np.random.default_rng([seed, cls, inst])
        k = rng.choice(len(b.weights[row]), p=b.weights[row] / b.weights[row].sum())
        v = rng.multivariate_normal(b.means[row, k], b.covariances[row, k], method="cholesky")
        return np.clip(v, -1.0, 1.0)  # E's features are tanh outputs

    def features(self, labels: np.ndarray, instances: np.ndarray) -> np.ndarray:
        """(H, W) class ids and instance ids -> (feat_num, H, W) float32 feature map."""
        if instances.size and (instances.min() < 0 or instances.max() >= _KEY):
            raise ValueError(f"StyleSampler: instance ids must lie in [0, {_KEY}), got "
                             f"{instances.min()}..{instances.max()}")
        key = labels.astype(np.int64) * _KEY + instances.astype(np.int64)
        keys, inverse = np.unique(key.reshape(-1), return_inverse=True)
        table = np.stack([self.vector(k // _KEY, k % _KEY) for k in keys]).astype(np.float32)
        return table[inverse].T.reshape(-1, *labels.shape)


@dataclass
class FitStylesArgs:
    """``vid2vid fit-styles`` options."""

    checkpoint: str
    shards: str  # the training shards (real frames)
    split: str = "train"
    components: int = 5  # mixture components per class (fewer when a class has fewer distinct vectors)
    max_clips: int = 0  # 0 = every clip
    max_per_class: int = 20000  # vectors kept per class
    seed: int = 0
    out: str | None = None  # default <checkpoint>/styles.npz
