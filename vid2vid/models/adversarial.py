"""The discriminator side (D_I and the D_V family) and what it judges.

The discriminators are evaluated in ONE forward per step (real, fake and raw frames concatenated along
the batch): that is faster, and it is what DeepSpeed ZeRO-2 requires (a module forwarded twice before
one backward trips its gradient reduction).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from vid2vid.config import ModelConfig
from vid2vid.models.discriminators import DiscriminatorOutput, ImageDiscriminator, VideoDiscriminator, face_num_D
from vid2vid.models.face_crop import FaceBoxes, crop, face_boxes
from vid2vid.models.sampling import sample_image_indices, sample_video_window, video_window_flows
from vid2vid.models.vid2vid import SequenceOutput


@dataclass
class AdversarialInputs:
    """Everything the discriminator side needs for one step, frames at full clip length."""

    sources: Tensor  # (N, T, C, H, W) encoded source frames (D_I is conditioned on them)
    real: Tensor  # (N, T, 3, H, W)
    fake: Tensor  # (N, T, 3, H, W)
    fake_raw: Tensor | None  # hallucinated frames, judged by D_I too when flow warping is on
    real_flows: Tensor  # (N, T, 2, H, W) backward flows of the real frames (D_V condition)
    image_indices: list[int]  # frames D_I judges: 0 and the phi_I draws
    video_windows: list[list[int] | None]  # phi_V draw per temporal scale (None: clip too short)

    def detached(self) -> AdversarialInputs:
        raw = None if self.fake_raw is None else self.fake_raw.detach()
        return AdversarialInputs(self.sources, self.real, self.fake.detach(), raw, self.real_flows,
                                 self.image_indices, self.video_windows)


@dataclass
class Judgement:
    """Discriminator outputs for real and fake inputs."""

    image_real: DiscriminatorOutput
    image_fake: DiscriminatorOutput
    image_raw_fake: DiscriminatorOutput | None
    video_real: list[DiscriminatorOutput | None]
    video_fake: list[DiscriminatorOutput | None]
    face_real: DiscriminatorOutput | None = None
    face_fake: DiscriminatorOutput | None = None
    face_weight: float = 1.0  # 0 when no judged frame showed a head (the crops were then placeholders)


def draw_adversarial_inputs(cfg: ModelConfig, sources: Tensor, real: Tensor, real_flows: Tensor,
                            seq: SequenceOutput, generator: torch.Generator,
                            image_frames: int = 1) -> AdversarialInputs:
    """Apply phi_I and phi_V to the clip with an explicit RNG (reproducible across ranks).

    D_I judges frame 0 on every step, beside phi_I's ``image_frames`` draws from frames 1..T-1.
    Frame 0 is the output of G's no-previous-frame path, which starts every generated video; no later
    frame's loss reaches it (previous frames enter G detached), so without this it would learn only
    on the steps where phi_I drew it (and the VGG loss, when on). Frames 1.. get the flow and warp
    losses on every step. See the README, "First frames".
    """
    T = seq.frames.shape[1]
    indices = [0] + [1 + i for i in sample_image_indices(T - 1, image_frames, generator)] if T > 1 else [0]
    windows: list[list[int] | None] = []
    if cfg.video_discriminator:
        for s in range(cfg.n_scales_temporal):
            windows.append(sample_video_window(T, cfg.n_frames_D, cfg.n_frames_D**s, generator))
    raw = seq.hallucinated if cfg.flow_warping else None
    return AdversarialInputs(sources[:, :T], real[:, :T], seq.frames, raw, real_flows[:, :T], indices, windows)


def _split(out: DiscriminatorOutput, parts: int) -> list[DiscriminatorOutput]:
    chunks = [[[f.chunk(parts, dim=0)[i] for f in scale] for scale in out.features] for i in range(parts)]
    return [DiscriminatorOutput(features=c) for c in chunks]


def judge(d: DiscriminatorSide, adv: AdversarialInputs) -> Judgement:
    """One forward of every discriminator on real and fake inputs (batch-concatenated)."""
    idx = adv.image_indices
    sources = adv.sources[:, idx].flatten(0, 1)
    images = [adv.real[:, idx].flatten(0, 1), adv.fake[:, idx].flatten(0, 1)]
    if adv.fake_raw is not None:
        images.append(adv.fake_raw[:, idx].flatten(0, 1))
    out = d.image(sources.repeat(len(images), 1, 1, 1), torch.cat(images))
    image_parts = _split(out, len(images))

    video_real: list[DiscriminatorOutput | None] = []
    video_fake: list[DiscriminatorOutput | None] = []
    for s, window in enumerate(adv.video_windows):
        if window is None or d.video is None:
            video_real.append(None)
            video_fake.append(None)
            continue
        flows = video_window_flows(adv.real_flows, window)
        frames = torch.cat([adv.real[:, window], adv.fake[:, window]])
        real_out, fake_out = _split(d.video(frames, flows.repeat(2, 1, 1, 1, 1), s), 2)
        video_real.append(real_out)
        video_fake.append(fake_out)
    raw = image_parts[2] if len(image_parts) == 3 else None
    judgement = Judgement(image_parts[0], image_parts[1], raw, video_real, video_fake)
    if d.face is not None:
        judge_faces(d, sources, images[0], images[1], judgement)
    return judgement


def judge_faces(d: DiscriminatorSide, sources: Tensor, real: Tensor, fake: Tensor, judgement: Judgement) -> None:
    """The face discriminator on the head crops of the frames D_I judged (final frames only).

    Frames without a head are left out. When none shows one, every frame is judged anyway with weight
    0, so the step's terms (and, in the split placement, the message layout) never change.
    """
    boxes = face_boxes(sources, d.cfg.face_crop)
    keep = boxes.found.nonzero().flatten()
    judgement.face_weight = 1.0 if keep.numel() else 0.0
    if not keep.numel():
        keep = torch.arange(sources.shape[0], device=sources.device)
    kept = FaceBoxes(boxes.top_left[keep], boxes.side, boxes.found[keep])
    faces = torch.cat([crop(real[keep], kept), crop(fake[keep], kept)])
    out = d.face(crop(sources[keep], kept).repeat(2, 1, 1, 1), faces)
    judgement.face_real, judgement.face_fake = _split(out, 2)


class DiscriminatorSide(nn.Module):
    """D_I, D_V over ``n_scales_temporal`` frame rates unless the video discriminator is ablated, and
    the face discriminator when ``model.face_discriminator`` is on (pose)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.image = ImageDiscriminator(cfg)
        self.video = VideoDiscriminator(cfg) if cfg.video_discriminator else None
        self.face = ImageDiscriminator(cfg, face_num_D(cfg)) if cfg.face_discriminator else None

    def forward(self, adv: AdversarialInputs) -> Judgement:
        return judge(self, adv)
