"""Writing videos (PyAV, encoded incrementally) and turning label maps into pictures."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

# Cityscapes labelId -> colour (the official palette; unlabelled ids are black).
_CITYSCAPES = {
    7: (128, 64, 128), 8: (244, 35, 232), 11: (70, 70, 70), 12: (102, 102, 156), 13: (190, 153, 153),
    17: (153, 153, 153), 19: (250, 170, 30), 20: (220, 220, 0), 21: (107, 142, 35), 22: (152, 251, 152),
    23: (70, 130, 180), 24: (220, 20, 60), 25: (255, 0, 0), 26: (0, 0, 142), 27: (0, 0, 70),
    28: (0, 60, 100), 31: (0, 80, 100), 32: (0, 0, 230), 33: (119, 11, 32),
}


def label_palette(label_nc: int) -> np.ndarray:
    """(label_nc, 3) uint8: Cityscapes colours where known, a fixed pseudo-random colour elsewhere."""
    rng = np.random.default_rng(1234)
    palette = rng.integers(0, 256, (max(label_nc, 1), 3), dtype=np.uint8)
    palette[0] = 0
    for i, c in _CITYSCAPES.items():
        if i < label_nc:
            palette[i] = c
    return palette


def colorize_labels(labels: np.ndarray, label_nc: int) -> np.ndarray:
    """(..., H, W) integer ids -> (..., H, W, 3) uint8 RGB."""
    return label_palette(label_nc)[np.clip(labels, 0, max(label_nc - 1, 0))]


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """(..., 3, H, W) float in [-1, 1] -> (..., H, W, 3) uint8."""
    x = ((frames.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.movedim(-3, -1).cpu().numpy()


def source_picture(labels: torch.Tensor, label_nc: int) -> np.ndarray:
    """A viewable picture of a source frame: coloured ids, or the dense map's first channels as grey."""
    if label_nc > 0:
        return colorize_labels(labels.cpu().numpy(), label_nc)
    x = labels.float()
    x = x / x.max().clamp(min=1)
    grey = (x.cpu().numpy() * 255).astype(np.uint8)
    if grey.ndim == 3:  # (C, H, W): first channel
        grey = grey[0]
    return np.repeat(grey[..., None], 3, axis=-1)


class VideoWriter:
    """Incremental H.264 mp4 writer: frames go to the encoder as they come (constant memory)."""

    def __init__(self, path: str | Path, fps: float = 15.0):
        import av

        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._container = av.open(str(self.path), mode="w")
        self._fps = fps
        self._stream = None
        self.frames = 0

    def write(self, frame: np.ndarray) -> None:
        """One (H, W, 3) uint8 RGB frame; H and W are padded to even sizes (H.264 needs them)."""
        import av

        frame = np.ascontiguousarray(frame)
        h, w = frame.shape[:2]
        if h % 2 or w % 2:
            frame = np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._stream is None:
            from fractions import Fraction

            self._stream = self._container.add_stream("libx264", rate=Fraction(self._fps).limit_denominator(1000))
            self._stream.width, self._stream.height = frame.shape[1], frame.shape[0]
            self._stream.pix_fmt = "yuv420p"
            self._stream.options = {"crf": "18"}
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            self._container.mux(packet)
        self.frames += 1

    def close(self) -> None:
        if self._stream is not None:
            for packet in self._stream.encode():
                self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: float = 15.0) -> Path:
    with VideoWriter(path, fps) as writer:
        for frame in frames:
            writer.write(frame)
    return Path(path)


def side_by_side(*panels: np.ndarray) -> np.ndarray:
    """Concatenate (H, W, 3) panels horizontally."""
    return np.concatenate(panels, axis=1)
