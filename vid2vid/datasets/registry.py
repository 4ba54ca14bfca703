"""``data.source_kind`` -> its reader: one reader per data source, every reader module imported here.

Sources (``DataConfig.source_kind``; ``auto`` detects from the path, see :func:`detect_kind`):

- ``vid2vid``: ``<root>/<split>_A/<seq>/`` label maps, ``<split>_B/<seq>/`` RGB frames,
  ``<split>_inst/<seq>/`` instance maps (optional), files paired in sorted order as in the reference.
  A split without ``_B`` (the sample's ``test``) is labels-only: inference clips without frames/flow.
- ``cityscapes``: ``<root>/leftImg8bit_sequence/<split>/<city>/<city>_<seq>_<frame>_leftImg8bit.png``
  plus a parallel label folder (``DataConfig.cityscapes_label_dir``) holding one ``*labelIds.png`` per
  frame, and optionally ``*instanceIds.png`` (same folder or ``cityscapes_instance_dir``). Files are
  matched by the ``<city>_<seq>_<frame>`` key; a sequence is one ``<city>_<seq>`` snippet.
- ``video``: a video file or a folder of them, decoded with decord; the source (label) is the Canny edge
  map of each resized frame, 0/1 (edge->video: ``label_nc 0, input_nc 1``), instances are all zero.
- ``synthetic``: street scenes from :mod:`vid2vid.datasets.synthetic` with their EXACT flow.
- ``face`` / ``pose``: dense multi-channel sources (face sketches from landmarks, DensePose + OpenPose),
  read by :mod:`vid2vid.datasets.face` and :mod:`vid2vid.datasets.pose`.

``DataConfig.split`` names the split(s) to prepare: ``train``, ``train,test`` or ``all`` (every
``<split>_A`` / ``leftImg8bit_sequence/<split>`` found). Video and synthetic sources have no split
folders: all their sequences go to the one split named (``all`` means ``train``).

Listing never decodes pixels (only headers), so it stays fast on the driver; everything that needs
pixels fails inside :meth:`Source.read` with a :class:`BadInput` naming the file and frame.
"""

from __future__ import annotations

from pathlib import Path

from vid2vid.datasets.face import FaceSketches
from vid2vid.datasets.pose import PoseMaps
from vid2vid.datasets.readers import CityscapesRaw, SyntheticScenes, Vid2VidFolders, VideoFiles
from vid2vid.datasets.sources import VIDEO_EXTS, Source

SOURCE_KINDS = ("synthetic", "vid2vid", "cityscapes", "video", "face", "pose")
SOURCES: dict[str, type[Source]] = {"vid2vid": Vid2VidFolders, "cityscapes": CityscapesRaw, "video": VideoFiles,
                                    "synthetic": SyntheticScenes, "face": FaceSketches, "pose": PoseMaps}


def detect_kind(source: str) -> str:
    """Which reader a ``source`` path needs; raises ``FileNotFoundError``/``ValueError`` naming it."""
    if source == "synthetic":
        return "synthetic"
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist (or is unreadable)")
    if path.is_file():
        if path.suffix.lower() in VIDEO_EXTS:
            return "video"
        raise ValueError(f"data source {source!r} is a file but not a video ({', '.join(sorted(VIDEO_EXTS))})")
    if (path / CityscapesRaw.FRAMES).is_dir():
        return "cityscapes"
    if any((path / d).is_dir() for d in ("pose_maps-densepose", "poses-openpose")):
        return "pose"
    if any((path / d).is_dir() for d in ("landmarks-dlib68", "landmarks")):
        return "face"
    if any(p.is_dir() for p in path.glob("*_A")):
        return "vid2vid"
    if any(p.suffix.lower() in VIDEO_EXTS for p in path.iterdir()):
        return "video"
    raise ValueError(f"cannot tell the layout of {source!r}: expected <split>_A/ folders (vid2vid), "
                     f"{CityscapesRaw.FRAMES}/ (raw Cityscapes), landmarks-dlib68/ (face), "
                     "pose_maps-densepose/ (pose) or video files; set data.source_kind")


def make_source(cfg) -> Source:
    kind = detect_kind(cfg.source) if cfg.source_kind == "auto" else cfg.source_kind
    if kind not in SOURCE_KINDS:
        raise ValueError(f"unknown data.source_kind {kind!r}; choose one of {SOURCE_KINDS}")
    return SOURCES[kind](cfg)
