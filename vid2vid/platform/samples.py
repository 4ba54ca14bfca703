"""Sample videos for MLflow: labels | generated | real, side by side, as an mp4 artifact."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from vid2vid import storage
from vid2vid.media import side_by_side, source_picture, to_uint8, write_video
from vid2vid.models.vid2vid import generate_sequence
from vid2vid.training.inputs import clip_inputs

log = logging.getLogger("vid2vid.train")


def render_sample(g_module: torch.nn.Module, cfg: Any, clip: Any, path: Path) -> Path:
    """Generate the whole clip with the current generator (no gradients) and write the triptych."""
    g_module.eval()
    with torch.no_grad():
        prepared = clip_inputs(cfg, clip, clip.num_frames, encoder=g_module)
        seq = generate_sequence(g_module, cfg, prepared.inputs, clip.num_frames)
    g_module.train()
    fake, real = to_uint8(seq.frames[0]), to_uint8(clip.frames[0])
    panels = (side_by_side(source_picture(clip.labels[0, t], cfg.label_nc), fake[t], real[t])
              for t in range(clip.num_frames))
    return write_video(path, panels, fps=8)


def log_sample_video(wc: Any, tracker: Any, out_dir: str) -> Path | None:
    """Render the sample, log it to MLflow and keep it in ``out_dir``. For a URI ``out_dir`` (s3://...)
    the video is rendered into this node's local stand-in for it (``storage.local_dir``), which the
    tracking journal can point at during an outage, and uploaded."""
    clip, g = getattr(wc, "last_clip", None), wc.engines.get("generator")
    if clip is None or g is None or clip.frames is None:
        return None
    name = f"sample_step{tracker_step(wc)}.mp4"
    path = storage.local_dir(out_dir) / name
    try:
        render_sample(g.module, wc.cfg.model, clip.to(wc.device), path)
        if storage.is_remote(out_dir):
            storage.upload(path, storage.join(out_dir, name))
    except Exception as exc:  # a sample video must never fail a finished training run
        log.warning("sample video not written: %s", exc)
        return None
    tracker.log_artifact(path, artifact_path="samples")
    return path


def tracker_step(wc: Any) -> int:
    return int(getattr(wc, "last_step", 0))
