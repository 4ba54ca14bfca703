"""RAFT-small (Teed & Deng, ECCV 2020) in plain PyTorch, loading the official checkpoint strictly.

Architecture of the ``--small`` model of princeton-vl/RAFT, module names matching its checkpoint:

- ``fnet``: small encoder (7x7/2 conv, three stages of two bottleneck blocks at 32/64/96 channels, the
  last two stride 2, instance norm) -> 128-d features at 1/8 resolution, for both images;
- ``cnet``: the same encoder without normalisation -> 160 channels, split into the GRU's initial
  hidden state (96, tanh) and a context input (64, relu);
- all-pairs correlation (dot product / sqrt(128)) pooled into a 4-level pyramid, looked up in a
  radius-3 window around the current estimate (4 x 7 x 7 = 196 values per pixel);
- small update block: motion encoder, one 3x3 ConvGRU (hidden 96), flow head; 12 iterations;
- the 1/8-resolution flow is upsampled by bilinear interpolation x8 (RAFT-small has no convex
  upsampling mask).

Deviation from the public code, on purpose: the correlation lookup converts pixel coordinates with
``align_corners=False`` (``(2x+1)/W - 1``), which samples the same points as the original
``2x/(W-1) - 1`` with ``align_corners=True`` but stays finite when a pyramid level is one pixel wide.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vid2vid.errors import WeightsError

HIDDEN_DIM, CONTEXT_DIM = 96, 64
CORR_LEVELS, CORR_RADIUS = 4, 3
NUM_PARAMETERS = 990_162


class Bottleneck(nn.Module):
    def __init__(self, cin: int, cout: int, norm: bool, stride: int = 1):
        super().__init__()
        mid = cout // 4
        self.conv1 = nn.Conv2d(cin, mid, 1)
        self.conv2 = nn.Conv2d(mid, mid, 3, stride=stride, padding=1)
        self.conv3 = nn.Conv2d(mid, cout, 1)
        # InstanceNorm2d without affine parameters, as in RAFT-small: the checkpoint holds none.
        make_norm = (lambda c: nn.InstanceNorm2d(c)) if norm else (lambda c: nn.Identity())
        self.norm1, self.norm2, self.norm3 = make_norm(mid), make_norm(mid), make_norm(cout)
        self.downsample = None
        if stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride), make_norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)))
        y = F.relu(self.norm2(self.conv2(y)))
        y = F.relu(self.norm3(self.conv3(y)))
        if self.downsample is not None:
            x = self.downsample(x)
        return F.relu(x + y)


class SmallEncoder(nn.Module):
    def __init__(self, out_dim: int, norm: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 7, stride=2, padding=3)
        self.norm1 = nn.InstanceNorm2d(32) if norm else nn.Identity()
        stages, cin = [], 32
        for cout, stride in ((32, 1), (64, 2), (96, 2)):
            stages.append(nn.Sequential(Bottleneck(cin, cout, norm, stride), Bottleneck(cout, cout, norm)))
            cin = cout
        self.layer1, self.layer2, self.layer3 = stages
        self.conv2 = nn.Conv2d(96, out_dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.norm1(self.conv1(x)))
        return self.conv2(self.layer3(self.layer2(self.layer1(x))))


class MotionEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.convc1 = nn.Conv2d(CORR_LEVELS * (2 * CORR_RADIUS + 1) ** 2, 96, 1)
        self.convf1 = nn.Conv2d(2, 64, 7, padding=3)
        self.convf2 = nn.Conv2d(64, 32, 3, padding=1)
        self.conv = nn.Conv2d(128, 80, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        c = F.relu(self.convc1(corr))
        f = F.relu(self.convf2(F.relu(self.convf1(flow))))
        return torch.cat([F.relu(self.conv(torch.cat([c, f], 1))), flow], 1)  # 80 + 2 channels


class ConvGRU(nn.Module):
    def __init__(self, hidden: int, inp: int):
        super().__init__()
        self.convz = nn.Conv2d(hidden + inp, hidden, 3, padding=1)
        self.convr = nn.Conv2d(hidden + inp, hidden, 3, padding=1)
        self.convq = nn.Conv2d(hidden + inp, hidden, 3, padding=1)

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        hx = torch.cat([h, x], 1)
        z = torch.sigmoid(self.convz(hx))
        r = torch.sigmoid(self.convr(hx))
        q = torch.tanh(self.convq(torch.cat([r * h, x], 1)))
        return (1 - z) * h + z * q


class FlowHead(nn.Module):
    def __init__(self, cin: int, hidden: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class SmallUpdateBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = MotionEncoder()
        self.gru = ConvGRU(HIDDEN_DIM, CONTEXT_DIM + 82)
        self.flow_head = FlowHead(HIDDEN_DIM, 128)

    def forward(self, net, inp, corr, flow) -> tuple[torch.Tensor, torch.Tensor]:
        net = self.gru(net, torch.cat([inp, self.encoder(flow, corr)], 1))
        return net, self.flow_head(net)


class CorrPyramid:
    """All-pairs correlation of two feature maps, average-pooled into ``CORR_LEVELS`` levels."""

    def __init__(self, fmap1: torch.Tensor, fmap2: torch.Tensor):
        n, c, h, w = fmap1.shape
        corr = torch.einsum("nci,ncj->nij", fmap1.flatten(2), fmap2.flatten(2)) / c**0.5
        corr = corr.reshape(n * h * w, 1, h, w)  # one 2-D map of img2 per pixel of img1
        self.levels = [corr]
        for _ in range(CORR_LEVELS - 1):
            corr = F.avg_pool2d(corr, 2, stride=2)
            self.levels.append(corr)
        r = CORR_RADIUS
        d = torch.linspace(-r, r, 2 * r + 1, device=fmap1.device)
        # Window offsets in the checkpoint's order: the x offset varies along the FIRST window axis
        # (the public code stacks meshgrid(dy, dx) as (x, y)); the trained weights depend on it.
        ox, oy = torch.meshgrid(d, d, indexing="ij")
        self.delta = torch.stack([ox, oy], -1).view(1, 2 * r + 1, 2 * r + 1, 2)

    def __call__(self, coords: torch.Tensor) -> torch.Tensor:
        n, _, h, w = coords.shape
        centre = coords.permute(0, 2, 3, 1).reshape(n * h * w, 1, 1, 2)
        out = []
        for i, corr in enumerate(self.levels):
            pts = centre / 2**i + self.delta
            hl, wl = corr.shape[-2:]
            grid = torch.stack([(2 * pts[..., 0] + 1) / wl - 1, (2 * pts[..., 1] + 1) / hl - 1], -1)
            sampled = F.grid_sample(corr, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out.append(sampled.view(n, h, w, -1))
        return torch.cat(out, -1).permute(0, 3, 1, 2).contiguous()


def _coords_grid(n: int, h: int, w: int, device) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], 0).float()[None].expand(n, -1, -1, -1)


def _pad8(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Replicate-pad to a multiple of 8 and at least 64 px (4 pyramid levels need a 1/64-scale pixel)."""
    h, w = x.shape[-2:]
    ph, pw = max(64, -(-h // 8) * 8) - h, max(64, -(-w // 8) * 8) - w
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)  # centred, as RAFT's InputPadder does
    return F.pad(x, pad, mode="replicate"), pad


class RAFTSmall(nn.Module):
    def __init__(self):
        super().__init__()
        self.fnet = SmallEncoder(128, norm=True)
        self.cnet = SmallEncoder(HIDDEN_DIM + CONTEXT_DIM, norm=False)
        self.update_block = SmallUpdateBlock()

    def forward(self, image1: torch.Tensor, image2: torch.Tensor, iters: int = 12) -> torch.Tensor:
        """Flow image1 -> image2 in pixels, ``(N,2,H,W)``; images ``(N,3,H,W)`` RGB floats in 0..255."""
        if image1.shape != image2.shape or image1.dim() != 4 or image1.shape[1] != 3:
            raise ValueError(f"RAFT expects two (N,3,H,W) images of equal shape, got "
                             f"{tuple(image1.shape)} and {tuple(image2.shape)}")
        h, w = image1.shape[-2:]
        x1, pad = _pad8(2 * (image1.float() / 255.0) - 1)
        x2, _ = _pad8(2 * (image2.float() / 255.0) - 1)
        n = x1.shape[0]
        fmap1, fmap2 = self.fnet(torch.cat([x1, x2], 0)).split(n, 0)  # both images in one batch
        corr = CorrPyramid(fmap1, fmap2)
        net, inp = self.cnet(x1).split([HIDDEN_DIM, CONTEXT_DIM], 1)
        net, inp = torch.tanh(net), torch.relu(inp)
        coords0 = _coords_grid(n, *fmap1.shape[-2:], x1.device)
        coords1 = coords0.clone()
        for _ in range(iters):
            net, delta = self.update_block(net, inp, corr(coords1), coords1 - coords0)
            coords1 = coords1 + delta
        flow = coords1 - coords0
        up = 8 * F.interpolate(flow, scale_factor=8, mode="bilinear", align_corners=True)
        return up[..., pad[2]:pad[2] + h, pad[0]:pad[0] + w]


def load_raft_small(path, device="cpu") -> RAFTSmall:
    """The official RAFT-small checkpoint, loaded strictly (``weights_only=True``), in eval mode.

    The file is a plain state dict whose keys carry DataParallel's ``module.`` prefix; it is stripped.
    Any missing or unexpected key, shape mismatch or non-tensor entry is an error naming the key.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT-small weights not found: {path}")
    try:
        # map_location: the official file was saved from CUDA tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses pickled code/objects; say which file and why
        raise WeightsError(f"{path}: not a plain tensor state dict loadable with weights_only=True: {e}") from e
    if not isinstance(state, dict):
        raise WeightsError(f"{path}: expected a state dict (dict of tensors), got {type(state).__name__}")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = RAFTSmall()
    expected = model.state_dict()
    for key, value in state.items():
        if key not in expected:
            raise WeightsError(f"{path}: unexpected key {key!r} (not in RAFT-small)")
        if not isinstance(value, torch.Tensor):
            raise WeightsError(f"{path}: key {key!r} holds a {type(value).__name__}, not a tensor")
        if value.shape != expected[key].shape:
            raise WeightsError(f"{path}: shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, "
                               f"RAFT-small expects {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in state]
    if missing:
        raise WeightsError(f"{path}: missing key {missing[0]!r} ({len(missing)} missing in all)")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval()
