"""The G-rank <-> D-rank hand-off of the split placement, over torch.distributed point-to-point.

A generator rank sends its partner discriminator rank a control header and the adversarial inputs of
the step (encoded sources, real frames, fake and hallucinated frames, real flows, the phi_I / phi_V
draws). The discriminator rank returns the gradient of the generator's adversarial and
feature-matching losses with respect to the fake frames, plus the loss values for logging. Every
message is self-describing (a shape header first), so neither side needs to know the clip length.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from vid2vid.models.adversarial import AdversarialInputs

MAX_DIMS = 6


def send_tensors(tensors: list[Tensor], dst: int) -> None:
    """Send float32 tensors: their count and shapes first, then each tensor (blocking)."""
    header = torch.zeros(1 + len(tensors) * (MAX_DIMS + 1), dtype=torch.int64)
    header[0] = len(tensors)
    for i, t in enumerate(tensors):
        base = 1 + i * (MAX_DIMS + 1)
        header[base] = t.dim()
        header[base + 1: base + 1 + t.dim()] = torch.tensor(t.shape)
    count = torch.tensor([header.numel()], dtype=torch.int64)
    device = tensors[0].device if tensors else torch.device("cpu")
    dist.send(count.to(device), dst)
    dist.send(header.to(device), dst)
    for t in tensors:
        dist.send(t.detach().float().contiguous(), dst)


def recv_tensors(src: int, device: torch.device) -> list[Tensor]:
    count = torch.zeros(1, dtype=torch.int64, device=device)
    dist.recv(count, src)
    header = torch.zeros(int(count), dtype=torch.int64, device=device)
    dist.recv(header, src)
    header = header.cpu()
    out = []
    for i in range(int(header[0])):
        base = 1 + i * (MAX_DIMS + 1)
        shape = header[base + 1: base + 1 + int(header[base])].tolist()
        t = torch.empty(shape, dtype=torch.float32, device=device)
        dist.recv(t, src)
        out.append(t)
    return out


STOP, STEP, CHECKPOINT = 0, 1, 2


@dataclass
class Control:
    """What the G rank tells its D rank next: take a step, save a checkpoint (epoch end), or stop."""

    action: int  # STOP | STEP | CHECKPOINT
    epoch: int
    step: int
    checkpoint: bool  # with STEP: report a checkpoint after this step
    lr_factor: float
    report: bool = True  # with STEP: report to Ray Train after this step (the G rank's cadence decides)

    def tensor(self) -> Tensor:
        return torch.tensor([self.action, self.epoch, self.step, float(self.checkpoint), self.lr_factor,
                             float(self.report)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: Tensor) -> Control:
        v = t.tolist()
        return cls(int(v[0]), int(v[1]), int(v[2]), bool(v[3]), float(v[4]), bool(v[5]))


def send_control(control: Control, dst: int, device: torch.device) -> None:
    dist.send(control.tensor().to(device), dst)


def recv_control(src: int, device: torch.device) -> Control:
    t = torch.zeros(6, dtype=torch.float64, device=device)
    dist.recv(t, src)
    return Control.from_tensor(t.cpu())


def adversarial_names(adv: AdversarialInputs, face: bool = False) -> tuple[list[str], list[str]]:
    """Names of the generator-adversarial and discriminator terms, in ``Objective``'s order, so the D
    rank can send bare values and the G rank can still log them by name. ``face``: the model has a
    face discriminator."""
    g_names, d_names = ["image_gan", "image_feat"], ["image"]
    if adv.fake_raw is not None:
        g_names += ["image_raw_gan", "image_raw_feat"]
        d_names += ["image_raw"]
    for s, window in enumerate(adv.video_windows):
        if window is not None:
            g_names += [f"video{s}_gan", f"video{s}_feat"]
            d_names += [f"video{s}"]
    if face:
        g_names += ["face_gan", "face_feat"]
        d_names += ["face"]
    return g_names, d_names


def _encode_draws(adv: AdversarialInputs, device: torch.device) -> Tensor:
    """phi_I indices and the phi_V windows as one float vector (-1 marks a skipped scale)."""
    values = [len(adv.image_indices), *adv.image_indices, len(adv.video_windows)]
    for window in adv.video_windows:
        values += [-1] if window is None else [len(window), *window]
    return torch.tensor(values, dtype=torch.float32, device=device)


def _decode_draws(t: Tensor) -> tuple[list[int], list[list[int] | None]]:
    v = [int(x) for x in t.tolist()]
    n = v[0]
    indices, pos = v[1:1 + n], 1 + n
    windows: list[list[int] | None] = []
    for _ in range(v[pos]):
        pos += 1
        if v[pos] == -1:
            windows.append(None)
            continue
        windows.append(v[pos + 1: pos + 1 + v[pos]])
        pos += v[pos]
    return indices, windows


def send_adversarial(adv: AdversarialInputs, dst: int) -> None:
    tensors = [adv.sources, adv.real, adv.fake, adv.real_flows, _encode_draws(adv, adv.fake.device)]
    if adv.fake_raw is not None:
        tensors.append(adv.fake_raw)
    send_tensors(tensors, dst)


def recv_adversarial(src: int, device: torch.device) -> AdversarialInputs:
    """The D side's copy; fake frames are leaves that require grad so D can return dL/dfake."""
    t = recv_tensors(src, device)
    indices, windows = _decode_draws(t[4])
    fake = t[2].requires_grad_(True)
    raw = t[5].requires_grad_(True) if len(t) > 5 else None
    return AdversarialInputs(t[0], t[1], fake, raw, t[3], indices, windows)
