"""The prepare pipeline (Ray Data): sources -> frames, labels, flow -> clip shards + manifest.json.

Plan (driver, no pixels): list sequences, cut each into clips of ``clip_len`` frames every
``clip_stride`` frames, group consecutive clips into shard tasks, skip tasks whose shard is already
complete. Execute (Ray Data, streaming, one shard task per row, so blocks stay one shard big):

    from_items(tasks) -> map_batches(_ShardWorker, actor pool of one actor per CPU)
                         read (decode + resize) -> flow (estimator loaded once) -> write (temp + rename)
                      -> take_all(): one small summary row per shard (clips, timings, reject)

Every input that cannot be prepared becomes a reject ``{path, frame, reason}`` in the manifest and the
closing summary; the run fails only when nothing at all could be prepared.

Validation split (:func:`with_val_split`): evaluation reads ``val``. It is the source's own (a
requested ``val``, Cityscapes' ``leftImg8bit_sequence/val`` or a vid2vid ``val_A`` next to
``train_A``, prepared along with ``train`` even when only ``train`` was asked for, and synthetic
scenes' ``data.synthetic_val_sequences``), else every sequence of ``data.val_source`` (a folder of the
same layout), else training sequences held out by name (``data.val_sequences``) or by fraction
(``data.val_fraction``, evenly spread over the sorted names). The manifest records where it came
from (``splits.val.origin``).

Flow convention: ``flow[t] = estimate_flow(frame[t], frame[t-1])`` (backward, Middlebury), so
``warp(frame[t-1], flow[t]) ~ frame[t]``; its confidence is forward-backward consistency. Synthetic
scenes store their EXACT flow and validity mask instead. Flow is estimated once per shard task on
consecutive frames, so overlapping clips share it; each clip's first flow and confidence are zero.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from vid2vid import storage
from vid2vid.config import ConfigError, DataConfig, parse_resolution, validate
from vid2vid.datasets import shards
from vid2vid.datasets.labels import BadInput, instance_edges
from vid2vid.datasets.readers import CityscapesRaw
from vid2vid.datasets.registry import SOURCES, detect_kind, make_source
from vid2vid.datasets.sources import FrameBlock, Listing, Reject, SequenceSpec
from vid2vid.errors import UserError

STAGES = ("list", "decode", "resize", "flow", "write")
VAL = "val"
log = logging.getLogger(__name__)


class PrepareError(UserError, RuntimeError):
    """Nothing could be prepared (every input rejected) or the output folder is inconsistent."""


@dataclass
class ShardTask:
    """One shard: consecutive clips of one sequence, read, flowed and written by one Ray row."""

    spec: SequenceSpec
    path: str  # relative to the output folder
    starts: list[int]  # first frame of each clip, in the sequence
    first_clip: int

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ShardTask:
        d = json.loads(text)
        return cls(SequenceSpec(**d.pop("spec")), **d)


@dataclass
class PrepareSummary:
    """What a prepare run did; ``format()`` is the closing summary printed by the CLI."""

    out: str
    clips: dict[str, int]  # clips per split in the prepared folder (this run's and kept shards)
    written: dict[str, int]  # clips written by this run
    skipped_shards: int  # complete shards kept from an earlier run
    frames: int  # frames decoded by this run
    rejected: list[Reject] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)  # list + per-stage task time, total wall
    val_origin: str | None = None  # where the val split came from (None: there is none)

    @property
    def frames_per_second(self) -> float:
        return self.frames / max(self.seconds.get("total", 0.0), 1e-9)

    def format(self) -> str:
        lines = [f"prepared {self.out}"]
        for split, n in sorted(self.clips.items()):
            lines.append(f"  {split}: {n} clips ({self.written.get(split, 0)} written now)"
                         + (f"; {self.val_origin}" if split == VAL and self.val_origin else ""))
        if VAL not in self.clips:
            lines.append("  no val split: evaluation needs data.val_source, data.val_sequences or "
                         "data.val_fraction (or eval.split=train)")
        if self.skipped_shards:
            lines.append(f"  kept {self.skipped_shards} complete shards from an earlier run")
        stage = ", ".join(f"{k} {self.seconds.get(k, 0.0):.1f}s" for k in STAGES)
        lines.append(f"  {self.frames} frames in {self.seconds.get('total', 0.0):.1f}s "
                     f"({self.frames_per_second:.1f} frames/s); task time: {stage}")
        lines.append(f"  rejected {len(self.rejected)} inputs" + (":" if self.rejected else ""))
        for r in self.rejected:
            where = r.path if r.frame is None else f"{r.path} (frame {r.frame})"
            lines.append(f"    {where}: {r.reason}")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# planning (driver)


def _spec_path(spec: SequenceSpec) -> str:
    if spec.video:
        return spec.video
    if spec.labels:
        return str(Path(spec.labels[0]).parent)
    return spec.name


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _clips_per_shard(cfg: DataConfig) -> int:
    """At most ``rows_per_shard`` clips, fewer when they would exceed ``shard_mb`` uncompressed."""
    w, h = cfg.size
    clip_bytes = cfg.clip_len * w * h * 11  # labels, instances, edges, confidence 1 B; RGB 3; flow 2x2
    return max(1, min(cfg.rows_per_shard, cfg.shard_mb * 2**20 // clip_bytes))


def plan(specs: list[SequenceSpec], cfg: DataConfig) -> tuple[list[ShardTask], list[Reject]]:
    """Cut sequences into clips and group the clips into shard tasks; short sequences are rejects."""
    stride = cfg.clip_stride or cfg.clip_len
    per_shard = _clips_per_shard(cfg)
    tasks, rejects = [], []
    for spec in specs:
        if spec.num_frames < cfg.clip_len:
            rejects.append(Reject(_spec_path(spec), f"sequence shorter than a clip: {spec.num_frames} "
                                                    f"frames < clip_len {cfg.clip_len}", split=spec.split))
            continue
        starts = list(range(0, spec.num_frames - cfg.clip_len + 1, stride))
        for part, i in enumerate(range(0, len(starts), per_shard)):
            path = f"{spec.split}/{_safe(spec.name)}-{part:04d}.parquet"
            tasks.append(ShardTask(spec, path, starts[i:i + per_shard], i))
    return tasks, rejects


def _settings(cfg: DataConfig, kind: str, source) -> dict:
    """What makes two shards interchangeable; stored in each shard so re-runs can trust it."""
    return {"schema_version": shards.SCHEMA_VERSION, "source_kind": kind, "resolution": list(cfg.size),
            "clip_len": cfg.clip_len, "clip_stride": cfg.clip_stride or cfg.clip_len,
            "label_nc": source.label_nc, "flow": _estimator(cfg, kind)}


def _estimator(cfg: DataConfig, kind: str) -> str:
    return "exact" if kind == "synthetic" else cfg.flow


# ------------------------------------------------------------------------------------------------
# the Ray Data worker


class _ShardWorker:
    """Ray Data actor: read -> flow -> write for one shard task per call.

    The three stages run in one actor on purpose. The flow estimator must live in an actor (RAFT loads
    once), and an actor pool sized to the CPUs holds every CPU slot: separate read or write TASK
    stages would then wait for a free slot until the pool shut down (Ray Data also fuses a preceding
    map into the actor anyway). One actor per CPU doing all three keeps every CPU busy; the stages are
    still timed separately for the summary.
    """

    def __init__(self, cfg: DataConfig, kind: str, settings: dict, out: str):
        from vid2vid.datasets.flow import FlowEstimator

        pin_threads(_actor_cpus())
        self.cfg, self.settings, self.out = cfg, settings, out
        self.source = SOURCES[kind](cfg)
        self.estimator = None if kind == "synthetic" else FlowEstimator(cfg.flow, cfg.raft_weights)
        self.warm_up()

    def warm_up(self) -> None:
        """Pay the first call's one-off costs here (lazy imports and codec set-up in PIL, OpenCV and
        Parquet, the flow method's first run) while the pool starts, not in the first shard task."""
        import io

        import pyarrow as pa
        import pyarrow.parquet as pq
        from PIL import Image

        from vid2vid.datasets.labels import resize_image, resize_nearest

        w, h = parse_resolution(self.cfg.resolution)
        rgb = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
        for fmt in ("PNG", "JPEG"):
            buf = io.BytesIO()
            Image.fromarray(rgb).save(buf, fmt)
            np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
        resize_image(rgb, (w // 2, h // 2))
        resize_nearest(rgb[..., 0], (w // 2, h // 2))
        if self.estimator is not None:
            self.backward_flow(np.stack([rgb, np.roll(rgb, 1, axis=1)]))
        pq.write_table(pa.table({"x": [1]}), io.BytesIO(), compression="zstd")

    def __call__(self, batch: dict) -> dict:
        rows = [self.run(ShardTask.from_json(str(text)), str(text)) for text in batch["task"]]
        return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}

    def run(self, task: ShardTask, text: str) -> dict:
        row = {"task": text, "error": "", "clips": 0, "frames": 0, "decode_s": 0.0, "resize_s": 0.0,
               "flow_s": 0.0, "write_s": 0.0}
        try:
            block = self.source.read(task.spec, task.starts[0], task.starts[-1] + self.cfg.clip_len)
        except BadInput as err:
            row["error"] = json.dumps(Reject.from_error(err, task.spec.split).to_dict())
            return row
        row.update(decode_s=block.decode_s, resize_s=block.resize_s)
        t0 = time.perf_counter()
        if block.frames is not None and block.flow is None:
            block.flow, block.confidence = self.backward_flow(block.frames)
        t1 = time.perf_counter()
        _write_task(task, block, self.cfg, self.settings, self.out)
        row.update(clips=len(task.starts), frames=len(block.labels), flow_s=t1 - t0,
                   write_s=time.perf_counter() - t1)
        return row

    def backward_flow(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``flow[t] = estimate_flow(frames[t], frames[t-1])`` with its forward-backward confidence."""
        flow = np.zeros(frames.shape[:3] + (2,), np.float32)
        conf = np.zeros(frames.shape[:3], np.uint8)
        for t in range(1, len(frames)):
            pair = self.estimator.pair(frames[t], frames[t - 1])
            flow[t], conf[t] = pair.forward, pair.confidence
        return flow, conf


def _actor_cpus() -> int:
    """The CPUs Ray gave this actor (1 outside a Ray actor)."""
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().get_actor_id() is None:
        return 1
    return max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1)))


def pin_threads(n: int) -> None:
    """OpenCV (resize, DIS flow) and torch (RAFT) use ``n`` threads: by default OpenCV starts one per
    core of the machine in every actor, so N actors on N cores oversubscribe them and scale worse."""
    import cv2
    import torch

    cv2.setNumThreads(n)
    torch.set_num_threads(n)


def _write_task(task: ShardTask, block: FrameBlock, cfg: DataConfig, settings: dict, out: str) -> None:
    first, n = task.starts[0], cfg.clip_len
    cols: dict[str, list[np.ndarray]] = {}
    for s in task.starts:
        sl = slice(s - first, s - first + n)
        inst = block.instances[sl]
        cols.setdefault("labels", []).append(block.labels[sl])
        cols.setdefault("instances", []).append(inst)
        cols.setdefault("instance_edges", []).append(instance_edges(inst))
        if task.spec.has_frames:
            flow = block.flow[sl].astype(np.float16)  # astype copies: zeroing is per clip
            conf = block.confidence[sl].astype(np.uint8)
            flow[0], conf[0] = 0, 0  # the clip's first frame has no previous frame in the clip
            cols.setdefault("frames", []).append(block.frames[sl])
            cols.setdefault("flow", []).append(flow)
            cols.setdefault("confidence", []).append(conf)
    table = shards.clips_table({k: np.stack(v) for k, v in cols.items()}, task.spec.name, task.starts,
                               list(range(task.first_clip, task.first_clip + len(task.starts))))
    shards.write_shard(table, storage.join(out, task.path), settings)


# ------------------------------------------------------------------------------------------------
# the validation split


def _own_val(cfg: DataConfig, kind: str) -> bool:
    """The source has a ``val`` split folder of its own (prepared even when ``data.split`` omits it)."""
    root = Path(cfg.source)
    return (kind == "vid2vid" and (root / f"{VAL}_A").is_dir()) or \
        (kind == "cityscapes" and (root / CityscapesRaw.FRAMES / VAL).is_dir())


def _as_val(specs: list[SequenceSpec]) -> list[SequenceSpec]:
    return [dataclasses.replace(s, split=VAL) for s in specs]


def with_val_split(cfg: DataConfig, kind: str, listing: Listing) -> tuple[Listing, str | None]:
    """``listing`` with its ``val`` sequences, and where they came from (module docstring); None when
    there is no validation split (evaluation then needs ``eval.split=train``)."""
    seqs, rejects = list(listing.sequences), list(listing.rejects)
    has_val = any(s.split == VAL and s.has_frames for s in seqs)
    if not has_val and _own_val(cfg, kind):
        own = make_source(dataclasses.replace(cfg, split=VAL)).list()
        seqs, rejects, has_val = seqs + own.sequences, rejects + own.rejects, True
    if has_val:
        if cfg.val_source or cfg.val_sequences or cfg.val_fraction:
            log.info("the source has its own %r split; data.val_source/val_sequences/val_fraction are unused", VAL)
        origin = ("synthetic: data.synthetic_val_sequences unseen scenes" if kind == "synthetic"
                  else f"the source's own {VAL!r} split")
        return Listing(seqs, rejects), origin
    if cfg.val_source:
        other = make_source(dataclasses.replace(cfg, source=cfg.val_source, split="all")).list()
        val = _as_val([s for s in other.sequences if s.has_frames])
        if not val:
            raise PrepareError(f"data.val_source={cfg.val_source}: no sequence with real frames to validate on")
        return Listing(seqs + val, rejects + other.rejects), f"data.val_source={cfg.val_source}"
    train = sorted((s for s in seqs if s.split == "train" and s.has_frames), key=lambda s: s.name)
    if cfg.val_sequences:
        names = {s.name for s in train}
        unknown = sorted(set(cfg.val_sequences) - names)
        if unknown:
            raise PrepareError(f"data.val_sequences: no training sequence named {unknown}; the training "
                               f"sequences are {sorted(names)}")
        held = set(cfg.val_sequences)
        origin = f"held out of train by name: {sorted(held)}"
    elif cfg.val_fraction > 0:
        if len(train) < 2:
            log.warning("data.val_fraction=%g: %d training sequence(s), none can be held out; no %r split "
                        "(evaluation needs eval.split=train)", cfg.val_fraction, len(train), VAL)
            return listing, None
        k = min(len(train) - 1, max(1, round(cfg.val_fraction * len(train))))
        held = {train[round(i)].name for i in np.linspace(0, len(train) - 1, k)}
        origin = f"held out of train: data.val_fraction={cfg.val_fraction:g}, {len(held)} of {len(train)} " \
                 f"sequences {sorted(held)}"
    else:
        return listing, None
    out = [dataclasses.replace(s, split=VAL) if s.split == "train" and s.name in held else s for s in seqs]
    return Listing(out, rejects), origin


# ------------------------------------------------------------------------------------------------
# entry point


def _check(cfg: DataConfig) -> None:
    validate(cfg)
    for key in ("rows_per_shard", "shard_mb"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"data.{key}: must be >= 1, got {getattr(cfg, key)}")
    for key in ("clip_stride", "flow_actors"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"data.{key}: must be >= 0, got {getattr(cfg, key)}")


# ------------------------------------------------------------------------------------------------
# the data settings a prepared folder was made with (manifest["data"])

# Keys that change only the layout or the speed of preparing, never a clip's content.
LAYOUT_KEYS = ("split", "out", "overwrite", "rows_per_shard", "shard_mb", "flow_actors")
# Keys that matter only to some sources (by the prepared folder's source_kind); all others always do.
KIND_KEYS = {"synthetic_sequences": {"synthetic"}, "synthetic_frames": {"synthetic"}, "seed": {"synthetic", "pose"},
             "canny_low": {"video"}, "canny_high": {"video"}, "label_nc": {"vid2vid", "cityscapes"},
             "cityscapes_label_dir": {"cityscapes"}, "cityscapes_instance_dir": {"cityscapes"}}
# Where real data comes from, said when a preset for real data is run without data.source.
SOURCE_HINTS = {
    "face": "a folder with images/<seq>/ and landmarks-dlib68/<seq>/ (FaceForensics videos with dlib-68 "
            "landmarks; a 5-frame sample is NVlabs/imaginaire's dataset/unit_test/raw/fs_vid2vid/face)",
    "pose": "a folder with pose_maps-densepose/, poses-openpose/ and images/ (dance videos through DensePose and "
            "OpenPose; a 5-frame sample is NVlabs/imaginaire's dataset/unit_test/raw/vid2vid/pose)",
    "default": "a vid2vid-layout folder (train_A/ label maps, train_B/ frames, train_inst/) such as the Cityscapes "
               "sample in the first commit of github.com/NVIDIA/vid2vid (datasets/Cityscapes), or raw Cityscapes "
               "(leftImg8bit_sequence/ from www.cityscapes-dataset.com, with data.source_kind=cityscapes and one "
               "*labelIds.png per frame), or data.source=synthetic for generated street scenes",
}


def _source_id(source: str) -> str:
    return source if source == "synthetic" else str(Path(source).expanduser().resolve())


def data_settings(cfg: DataConfig) -> dict:
    """The ``data.*`` values a prepared folder's content depends on, as recorded in its manifest."""
    values = {k: v for k, v in asdict(cfg).items() if k not in LAYOUT_KEYS}
    values["source"] = _source_id(cfg.source) if cfg.source is not None else None
    values["resolution"] = "x".join(map(str, cfg.size))
    values["clip_stride"] = cfg.clip_stride or cfg.clip_len
    return values


def _recorded(manifest: dict) -> dict:
    """The settings of a manifest; one written before they were recorded gives what it has."""
    if "data" in manifest:
        return manifest["data"]
    return {"resolution": "x".join(map(str, manifest["resolution"])), "clip_len": manifest["clip_len"],
            "clip_stride": manifest["clip_stride"]}


def settings_mismatch(manifest: dict, cfg: DataConfig) -> dict[str, tuple]:
    """``key -> (value the folder was prepared with, value asked now)`` for every differing key."""
    kind = manifest.get("source_kind")
    flows = kind != "synthetic"  # synthetic scenes store their exact flow whatever data.flow says
    asked = data_settings(cfg)
    out = {}
    for key, was in _recorded(manifest).items():
        now = asked.get(key)
        if key in KIND_KEYS and kind not in KIND_KEYS[key]:
            continue
        if key == "source_kind":  # "auto" is whatever the folder was found to be
            was, now = (kind if v == "auto" else v for v in (was, now))
        if (key == "flow" and not flows) or (key == "raft_weights" and (not flows or asked["flow"] != "raft")):
            continue
        if was != now:
            out[key] = (was, now)
    return out


def require_source(cfg: DataConfig) -> None:
    """A preset for real data leaves ``data.source`` empty: say what to give and where it comes from."""
    if cfg.source is None or not str(cfg.source).strip():
        hint = SOURCE_HINTS.get(cfg.source_kind, SOURCE_HINTS["default"])
        raise ConfigError(f"data.source is required: give data.source=<path>, {hint}")


def check_prepared(cfg: DataConfig) -> dict | None:
    """The manifest of ``cfg.out`` when it was prepared with ``cfg``'s data settings; None when there is
    none (or ``data.overwrite=true`` rebuilds it). A folder prepared otherwise is a :class:`ShardError`
    naming each differing key."""
    require_source(cfg)
    if cfg.overwrite or not storage.is_file(storage.join(storage.normalize(cfg.out), shards.MANIFEST)):
        return None
    manifest = shards.load_manifest(cfg.out)
    diff = settings_mismatch(manifest, cfg)
    if diff:
        listed = "; ".join(f"data.{k}={_show(was)} there, {_show(now)} asked" for k, (was, now) in diff.items())
        raise shards.ShardError(f"{cfg.out} holds shards prepared with other data settings: {listed}. Rebuild "
                                f"them with data.overwrite=true, or give another data.out")
    return manifest


def _show(value) -> str:
    return "none" if value is None else str(value)


def preflight(cfg: DataConfig) -> None:
    """Everything about ``cfg`` that can fail without Ray: values, the source, RAFT weights, and an
    output folder prepared with other settings."""
    _check(cfg)
    check_prepared(cfg)
    if storage.is_remote(cfg.source):  # the output may be a URI, the sources are local files
        raise PrepareError(f"data.source={cfg.source}: sources are read from a local folder or file on the "
                           f"node that prepares them; download or sync them there first")
    if cfg.source != "synthetic" and not Path(cfg.source).expanduser().exists():
        raise PrepareError(f"data.source={cfg.source} does not exist")
    if cfg.source_kind == "auto":
        try:
            detect_kind(cfg.source)
        except (FileNotFoundError, ValueError) as err:
            raise PrepareError(f"data.source={cfg.source}: {err}") from None
    if cfg.flow == "raft" and cfg.source != "synthetic":
        if not cfg.raft_weights:
            raise ConfigError("data.raft_weights is required with data.flow=raft: the official RAFT-small "
                              "checkpoint raft-small.pth (github.com/princeton-vl/RAFT)")
        if not Path(cfg.raft_weights).is_file():
            raise PrepareError(f"data.raft_weights={cfg.raft_weights} does not exist")


def _ray_cpus() -> int:
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def _init_ray() -> None:
    import ray

    if not ray.is_initialized():
        ray.init()


def prepare(cfg: DataConfig, progress: bool = True, start_ray: Callable[[], None] | None = None) -> PrepareSummary:
    """Prepare ``cfg.source`` into clip shards under ``cfg.out``; see the module docstring.

    ``start_ray`` starts Ray once there is work for it (default: a plain ``ray.init()`` unless Ray is
    up), so a source whose every input is rejected while listing fails before Ray starts.
    Raises :class:`PrepareError` when every input is rejected.
    """
    import ray.data

    preflight(cfg)
    t_start = time.perf_counter()
    try:
        source = make_source(cfg)
        listing = source.list()
    except (FileNotFoundError, ValueError) as err:
        raise PrepareError(f"data.source={cfg.source}: {err}") from None
    kind = source.kind
    listing, val_origin = with_val_split(cfg, kind, listing)
    tasks, rejects = plan(listing.sequences, cfg)
    rejects = listing.rejects + rejects
    out = storage.normalize(cfg.out)  # a folder or a URI (s3://, gs://, file://): see vid2vid.storage
    storage.makedirs(out)
    shards.remove_temp_files(out)
    settings = _settings(cfg, kind, source)
    todo = [t for t in tasks
            if cfg.overwrite or not shards.shard_complete(storage.join(out, t.path), len(t.starts), settings)]
    seconds = dict.fromkeys(STAGES, 0.0)
    seconds["list"] = time.perf_counter() - t_start

    results = []
    if todo:
        (start_ray or _init_ray)()
        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = ray.data.from_items([{"task": t.to_json()} for t in todo], override_num_blocks=len(todo))
        workers = min(cfg.flow_actors or _ray_cpus(), len(todo))
        with warnings.catch_warnings():
            # max_restarts=0: a crashed worker fails the run (re-running resumes it) rather than
            # restarting, which also avoids Ray's error-level log about restartable actors whose
            # constructor arguments live in the object store. Ray 2.60 only takes it as a remote
            # arg, which it marks deprecated (removal announced for 2.64; the project pins 2.60).
            warnings.simplefilter("ignore", DeprecationWarning)
            ds = ds.map_batches(_ShardWorker, batch_size=1, compute=ray.data.ActorPoolStrategy(size=workers),
                                fn_constructor_kwargs={"cfg": cfg, "kind": kind, "settings": settings,
                                                       "out": out}, max_restarts=0)
        results = ds.take_all()

    failed = set()
    for r in results:
        if r["error"]:
            rejects.append(Reject(**json.loads(r["error"])))
            failed.add(str(r["task"]))
        for stage in ("decode", "resize", "flow", "write"):
            seconds[stage] += float(r[f"{stage}_s"])
    done = [t for t in tasks if t.to_json() not in failed]
    if not done:
        listed = "; ".join(f"{r.path}" + (f" (frame {r.frame})" if r.frame is not None else "")
                           + f": {r.reason}" for r in rejects[:5]) or "no inputs found"
        more = f" (and {len(rejects) - 5} more)" if len(rejects) > 5 else ""
        raise PrepareError(f"nothing prepared from {cfg.source}: every input was rejected: {listed}{more}")

    run_splits = {t.spec.split for t in tasks}
    if cfg.overwrite:
        _remove_stale(out, run_splits, {t.path for t in done})
    manifest = _manifest(cfg, kind, source, settings, done, rejects)
    if val_origin and VAL in manifest["splits"]:
        manifest["splits"][VAL]["origin"] = val_origin
    _carry_over(manifest, out, run_splits)
    shards.write_manifest(out, manifest)
    written: dict[str, int] = {}
    for r in results:
        if not r["error"]:
            split = ShardTask.from_json(str(r["task"])).spec.split
            written[split] = written.get(split, 0) + int(r["clips"])
    seconds["total"] = time.perf_counter() - t_start
    return PrepareSummary(out=out, clips={k: v["clips"] for k, v in manifest["splits"].items()},
                          written=written, skipped_shards=len(tasks) - len(todo),
                          frames=int(sum(int(r["frames"]) for r in results)), rejected=rejects,
                          seconds=seconds, val_origin=manifest["splits"].get(VAL, {}).get("origin"))


def _remove_stale(out: str, splits: set[str], keep: set[str]) -> None:
    """With ``overwrite``, shards of this run's splits that this run did not produce are deleted."""
    for split in splits:
        for p in storage.list_files(storage.join(out, split), suffix=".parquet", recursive=False):
            if f"{split}/{storage.name(p)}" not in keep:
                storage.delete_file(p)


def _carry_over(manifest: dict, out: str, run_splits: set[str]) -> None:
    """Keep the splits an earlier, compatible run prepared into the same folder (``split=train`` then
    ``split=test``), so each run does not forget the others; their rejects carry over with them."""
    try:
        old = shards.load_manifest(out)
    except (shards.ShardError, ValueError):
        return
    if old.get("settings") != manifest["settings"]:
        return
    kept = [s for s in old["shards"] if s["split"] not in run_splits and storage.is_file(storage.join(out, s["path"]))]
    # A sequence this run put in a split must not stay in another one (a val sequence trained on now)
    current = {s["sequence"] for s in manifest["shards"]}
    leaking = {s["split"] for s in kept if s["sequence"] in current}
    for split in sorted(leaking):
        log.warning("%s: dropping the earlier %r split: some of its sequences are in this run's splits", out, split)
    kept = [s for s in kept if s["split"] not in leaking]
    kept_splits = {s["split"] for s in kept}
    manifest["shards"] += kept
    manifest["splits"].update({k: v for k, v in old["splits"].items() if k in kept_splits})
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    manifest["rejected"] += [r for r in old["rejected"] if r.get("split") in kept_splits]


def _manifest(cfg, kind, source, settings, done, rejects) -> dict:
    splits: dict[str, dict] = {}
    for t in done:
        info = splits.setdefault(t.spec.split, {"clips": 0, "sequences": set(), "has_frames": t.spec.has_frames})
        info["clips"] += len(t.starts)
        info["sequences"].add(t.spec.name)
    for info in splits.values():
        info["sequences"] = len(info["sequences"])
    edges = kind == "video"
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "source": str(cfg.source),
        "source_kind": kind,
        "label_nc": source.label_nc,
        "input_nc": source.input_nc,
        "labels": getattr(source, "labels_doc", "")
        or ("Canny edge map of the frame, values 0/1" if edges else "label ids < label_nc"),
        "resolution": list(cfg.size),
        "clip_len": cfg.clip_len,
        "clip_stride": settings["clip_stride"],
        "flow": {"estimator": _estimator(cfg, kind), "weights": cfg.raft_weights if cfg.flow == "raft" else None,
                 "direction": "backward: flow[t] maps frame t to frame t-1; flow[0] = 0",
                 "confidence": "forward-backward consistency" if kind != "synthetic" else "exact validity"},
        "splits": dict(sorted(splits.items())),
        "shards": [{"path": t.path, "split": t.spec.split, "sequence": t.spec.name, "clips": len(t.starts),
                    "first_clip": t.first_clip} for t in done],
        "rejected": [r.to_dict() for r in rejects],
        "settings": settings,
        "data": data_settings(cfg),  # what check_prepared compares a later run's config with
    }
