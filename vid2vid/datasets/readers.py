"""The readers of the image-folder, video-file and synthetic sources (see :mod:`vid2vid.datasets.registry`)."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from vid2vid.datasets.labels import BadInput, canny_edges, resize_image
from vid2vid.datasets.sources import (
    IMAGE_EXTS,
    VIDEO_EXTS,
    FrameBlock,
    ImageFolderSource,
    Listing,
    Reject,
    SequenceSpec,
    Source,
    list_files,
    list_subdirs,
    requested_splits,
    single_split,
)


class Vid2VidFolders(ImageFolderSource):
    kind = "vid2vid"

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        seqs, rejects = [], []
        available = sorted(p.name[:-2] for p in root.glob("*_A") if p.is_dir())
        for split in requested_splits(self.cfg.split, available):
            first = len(rejects)
            a_dir, b_dir, i_dir = (root / f"{split}_{s}" for s in ("A", "B", "inst"))
            if not a_dir.is_dir():
                rejects.append(Reject(str(a_dir), f"no label folder for split {split!r}; found splits "
                                                  f"{available}"))
                continue
            dirs, bad = list_subdirs(a_dir)
            rejects += bad
            if not dirs and not bad:
                rejects.append(Reject(str(a_dir), "empty folder: no sequence sub-folders"))
            for d in dirs:
                try:
                    seqs.append(self._list_one(split, d, b_dir, i_dir))
                except BadInput as err:
                    rejects.append(Reject.from_error(err))
            for r in rejects[first:]:
                r.split = split
        return Listing(seqs, rejects)

    def _list_one(self, split: str, a_seq: Path, b_dir: Path, i_dir: Path) -> SequenceSpec:
        labels = list_files(a_seq, IMAGE_EXTS)
        if not labels:
            raise BadInput(str(a_seq), "empty folder: no label maps")
        streams = {}
        for what, parent in (("frames", b_dir), ("instances", i_dir)):
            if not parent.is_dir():  # no <split>_B: inference split; no <split>_inst: no instances
                streams[what] = []
                continue
            folder = parent / a_seq.name
            if not folder.is_dir():
                raise BadInput(str(folder), f"missing {what} folder for sequence {a_seq.name}")
            files = list_files(folder, IMAGE_EXTS)
            if len(files) != len(labels):
                raise BadInput(str(folder), f"label/{what} count mismatch: {len(labels)} label maps in "
                                            f"{a_seq} but {len(files)} {what}")
            streams[what] = files
        return self._spec(split, a_seq.name, labels, streams["frames"], streams["instances"])


_CS_KEY = re.compile(r"^([^_]+_\d+_\d+)_")


class CityscapesRaw(ImageFolderSource):
    kind = "cityscapes"
    FRAMES = "leftImg8bit_sequence"

    def list(self) -> Listing:
        root = Path(self.cfg.source)
        frame_root = root / self.FRAMES
        label_root = root / self.cfg.cityscapes_label_dir
        inst_root = root / (self.cfg.cityscapes_instance_dir or self.cfg.cityscapes_label_dir)
        seqs, rejects = [], []
        available = sorted(p.name for p in frame_root.iterdir() if p.is_dir()) if frame_root.is_dir() else []
        if not label_root.is_dir():
            return Listing([], [Reject(str(label_root), "label folder not found (data.cityscapes_label_dir)")])
        for split in requested_splits(self.cfg.split, available):
            first = len(rejects)
            cities, bad = list_subdirs(frame_root / split)
            rejects += bad
            if not cities and not bad:
                rejects.append(Reject(str(frame_root / split), "empty folder: no city sub-folders"))
            for city in cities:
                try:
                    seqs += self._list_city(split, city, label_root / split / city.name,
                                            inst_root / split / city.name, rejects)
                except BadInput as err:
                    rejects.append(Reject.from_error(err))
            for r in rejects[first:]:
                r.split = split
        return Listing(seqs, rejects)

    @staticmethod
    def _by_key(folder: Path, suffix: str) -> dict[str, Path]:
        if not folder.is_dir():
            return {}
        out = {}
        for p in list_files(folder, IMAGE_EXTS):
            m = _CS_KEY.match(p.name)
            if m and p.name.endswith(suffix):
                out[m.group(1)] = p
        return out

    def _list_city(self, split, city: Path, label_dir: Path, inst_dir: Path, rejects) -> list[SequenceSpec]:
        frames = self._by_key(city, "_leftImg8bit.png")
        if not frames:
            raise BadInput(str(city), "empty folder: no *_leftImg8bit.png frames")
        labels = self._by_key(label_dir, "labelIds.png")
        insts = self._by_key(inst_dir, "instanceIds.png")
        groups: dict[str, list[str]] = {}
        for key in frames:
            groups.setdefault(key.rsplit("_", 1)[0], []).append(key)
        specs = []
        for name, keys in sorted(groups.items()):
            keys.sort(key=lambda k: int(k.rsplit("_", 1)[1]))
            missing = [k for k in keys if k not in labels]
            if missing:
                rejects.append(Reject(str(frames[missing[0]]), f"label/frame count mismatch: {len(missing)} of "
                                      f"{len(keys)} frames of {name} have no *labelIds.png in {label_dir}"))
                continue
            use_inst = bool(insts) and all(k in insts for k in keys)
            specs.append(self._spec(split, name, [labels[k] for k in keys], [frames[k] for k in keys],
                                    [insts[k] for k in keys] if use_inst else []))
        return specs


class VideoFiles(Source):
    kind = "video"
    label_nc = 0
    input_nc = 1
    CHUNK = 16  # frames decoded per decord call: bounds memory at full source resolution

    def list(self) -> Listing:
        path = Path(self.cfg.source)
        split = single_split(self.cfg.split)
        try:
            files = [path] if path.is_file() else list_files(path, VIDEO_EXTS)
        except BadInput as err:
            return Listing([], [Reject.from_error(err, split)])
        if not files:
            return Listing([], [Reject(str(path), "empty folder: no video files "
                                                  f"({', '.join(sorted(VIDEO_EXTS))})", split=split)])
        seqs, rejects, names = [], [], set()
        for f in files:
            try:
                vr = self._open(str(f))
                n = len(vr)
            except BadInput as err:
                rejects.append(Reject.from_error(err, split))
                continue
            name = f.stem if f.stem not in names else f"{f.stem}_{f.suffix[1:]}"
            names.add(name)
            seqs.append(SequenceSpec(split=split, name=name, num_frames=n, video=str(f)))
        return Listing(seqs, rejects)

    @staticmethod
    def _open(path: str):
        import decord

        try:
            # One decoder thread: Ray already runs one task per CPU.
            return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)
        except Exception as err:
            raise BadInput(path, f"cannot open video: {type(err).__name__}: {str(err)[:200]}") from None

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        vr = self._open(spec.video)
        frames, decode_s, resize_s = [], 0.0, 0.0
        for a in range(start, stop, self.CHUNK):
            b = min(a + self.CHUNK, stop)
            t0 = time.perf_counter()
            try:
                # Decode at the native size and resize here: decord's own resize returns 4 or 6
                # channels for some widths (STACK.md).
                chunk = vr.get_batch(list(range(a, b))).asnumpy()
            except Exception as err:
                raise BadInput(spec.video, f"cannot decode frames {a}..{b - 1} (truncated or corrupt "
                                           f"video?): {type(err).__name__}: {str(err)[:200]}", a) from None
            t1 = time.perf_counter()
            frames += [resize_image(f, self.size) for f in chunk]
            decode_s += t1 - t0
            resize_s += time.perf_counter() - t1
        frames = np.stack(frames)
        edges = np.stack([canny_edges(f, self.cfg.canny_low, self.cfg.canny_high) for f in frames])
        return FrameBlock(edges, np.zeros_like(edges), frames, decode_s=decode_s, resize_s=resize_s)


class SyntheticScenes(Source):
    kind = "synthetic"

    def list(self) -> Listing:
        split = single_split(self.cfg.split)
        seqs = []
        for i in range(self.cfg.synthetic_sequences):
            # Same per-sequence seed and name as synthetic.make_dataset, so shards can be checked
            # against it, yet each sequence is generated independently inside its own Ray task.
            seed = int(np.random.SeedSequence([self.cfg.seed, i]).generate_state(1)[0])
            seqs.append(SequenceSpec(split=split, name=f"synthetic_{self.cfg.seed}_{i:04d}",
                                     num_frames=self.cfg.synthetic_frames, seed=seed))
        for i in range(self.cfg.synthetic_val_sequences):  # unseen scenes from their own seed stream
            seed = int(np.random.SeedSequence([self.cfg.seed, i, 1]).generate_state(1)[0])
            seqs.append(SequenceSpec(split="val", name=f"synthetic_{self.cfg.seed}_val_{i:04d}",
                                     num_frames=self.cfg.synthetic_frames, seed=seed))
        return Listing(seqs, [])

    def read(self, spec: SequenceSpec, start: int, stop: int) -> FrameBlock:
        from vid2vid.datasets.synthetic import make_sequence

        t0 = time.perf_counter()
        w, h = self.size
        # The whole scene is rendered: its layout depends on the sequence length (camera margins).
        seq = make_sequence(spec.num_frames, w, h, spec.seed)
        sl = slice(start, stop)
        return FrameBlock(seq.labels[sl], seq.instances[sl], seq.frames[sl], seq.flow[sl],
                          seq.valid[sl].astype(np.uint8), decode_s=time.perf_counter() - t0)
