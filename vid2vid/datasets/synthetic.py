"""Synthetic street scenes with EXACT optical flow: the embedded demo dataset and the flow-test oracle.

A scene is a stack of textured 2-D layers drawn in painter's order (back to front): sky, buildings,
trees and poles, sidewalk, road, pedestrians, cars. Each layer is a raster (colour texture, coverage
mask, Cityscapes labelId) that only translates: at frame ``t`` its top-left corner sits at
``offset[t]``, so the pixel ``p`` of a layer shows the layer point ``u = p - offset[t]``. Background
layers follow a slow camera pan (with parallax: the sky moves least) and a small vertical bob; cars and
pedestrians add their own horizontal speed. Every texture is random smooth noise (plus windows, tiles
and lane dashes) so flow estimators have something to track, and lighting never changes, so brightness
constancy holds exactly.

Exact flow, by construction: a point seen at ``p`` in frame ``t`` on layer ``l`` was at
``p + offset_l[t-1] - offset_l[t]`` in frame ``t-1``; that is ``flow[t](p)`` (Middlebury convention,
``frame[t](p) ~ frame[t-1](p + flow[t](p))``). At pixels disoccluded in frame ``t`` (hidden behind
another layer in ``t-1``, or outside the image) the flow is still the motion of the layer visible in
frame ``t``, which points to where that surface *would* have been; ``valid[t]`` is False there.
``valid[t](p)`` is True where the target lies inside the image and every pixel used to interpolate it
in frame ``t-1`` shows the same layer; ``valid[0]`` is all False (no previous frame, ``flow[0] = 0``).

``motion="integer"`` rounds every offset to whole pixels: warping frame ``t-1`` with ``flow[t]`` then
reproduces frame ``t`` bit-exactly on valid pixels. The default ``"subpixel"`` is the realistic case;
there the warp differs only by bilinear re-interpolation of the smooth texture (a few grey levels).

Instances: ``255`` is background (as in the Cityscapes sample's instance PNGs), each car and each
pedestrian has its own id ``1, 2, ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

# Cityscapes labelIds used by the scenes.
ROAD, SIDEWALK, BUILDING, POLE, VEGETATION, SKY, PERSON, CAR = 7, 8, 11, 17, 21, 23, 24, 26
BACKGROUND_INSTANCE = 255
MIN_SIZE = 32


@dataclass
class SyntheticSequence:
    frames: np.ndarray  # (T,H,W,3) uint8 RGB
    labels: np.ndarray  # (T,H,W) uint8 Cityscapes labelIds
    instances: np.ndarray  # (T,H,W) uint8; 255 background, 1.. one id per car / pedestrian
    flow: np.ndarray  # (T,H,W,2) float32 exact backward flow t -> t-1; flow[0] = 0
    name: str
    valid: np.ndarray = field(default=None)  # (T,H,W) bool, where flow[t] is measured (see module doc)


@dataclass
class _Layer:
    texture: np.ndarray  # (h,w,3) float32 in [0,255]
    mask: np.ndarray  # (h,w) bool
    label: np.ndarray  # (h,w) uint8
    instance: int
    offsets: np.ndarray  # (T,2) float64 (x, y) of the raster's top-left corner in frame pixels

    def __post_init__(self):
        # Soften hard texture edges (windows, lane dashes, facade seams): a bilinear re-sampling of a
        # bilinear sample then stays within a few grey levels, and real cameras blur edges anyway.
        self.texture = cv2.GaussianBlur(np.clip(self.texture, 0, 255).astype(np.float32), (0, 0), 0.8)


# ---------------------------------------------------------------------------------------------------
# textures


def _noise(rng: np.random.Generator, h: int, w: int, scale: float) -> np.ndarray:
    """Smooth zero-mean noise of unit std with features about ``scale`` pixels wide."""
    gh, gw = int(h / scale) + 3, int(w / scale) + 3
    grid = rng.standard_normal((gh, gw)).astype(np.float32)
    big = cv2.resize(grid, (int(gw * scale), int(gh * scale)), interpolation=cv2.INTER_CUBIC)
    big = big[:h, :w]
    return (big - big.mean()) / (big.std() + 1e-6)


def _texture(rng: np.random.Generator, h: int, w: int, rgb, amp: float = 30.0) -> np.ndarray:
    """Base colour plus two octaves of luminance noise and a faint chroma noise."""
    lum = 0.65 * _noise(rng, h, w, 3.0) + 0.35 * _noise(rng, h, w, 8.0)
    tex = np.asarray(rgb, np.float32)[None, None, :] + amp * lum[..., None]
    tex += 0.25 * amp * np.stack([_noise(rng, h, w, 6.0) for _ in range(3)], axis=-1)
    return tex


def _ellipse(h: int, w: int, cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    return ((xs - cx) / rx) ** 2 + ((ys - cy) / ry) ** 2 <= 1.0


# ---------------------------------------------------------------------------------------------------
# scene layout


@dataclass
class _Frame:
    """Frame geometry and the raster margin that keeps panned background layers covering the view."""

    width: int
    height: int
    mx: int
    my: int

    @property
    def raster(self) -> tuple[int, int]:
        return self.height + 2 * self.my, self.width + 2 * self.mx


def _background(rng, g: _Frame, cam: np.ndarray) -> list[_Layer]:
    h, w = g.raster
    W, H = g.width, g.height
    y_sidewalk = int(0.58 * H) + g.my
    y_road = int(0.68 * H) + g.my
    base = np.array([-g.mx, -g.my], np.float64)
    layers = []

    def add(tex, mask, label, parallax):
        offsets = base + cam * np.array([parallax, 1.0])
        lab = np.where(mask, label, 0).astype(np.uint8) if np.isscalar(label) else label
        layers.append(_Layer(np.clip(tex, 0, 255), mask, lab, BACKGROUND_INSTANCE, offsets))

    # sky: brighter towards the horizon, soft clouds
    sky = _texture(rng, h, w, (110, 160, 225), amp=18.0)
    sky += np.linspace(-20, 25, h, dtype=np.float32)[:, None, None]
    add(sky, np.ones((h, w), bool), SKY, 0.25)

    # buildings: a row of facades with their own colours and a grid of darker windows
    tex = np.zeros((h, w, 3), np.float32)
    mask = np.zeros((h, w), bool)
    x = 0
    while x < w:
        bw = int(rng.uniform(0.12, 0.3) * W) + 4
        top = int(rng.uniform(0.05, 0.35) * H) + g.my
        colour = rng.uniform(90, 200) + rng.uniform(-30, 30, 3)
        tex[top:, x:x + bw] = _texture(rng, h - top, min(bw, w - x), colour, amp=25.0)
        mask[top:y_sidewalk + 3, x:x + bw] = True
        step = max(4, int(0.06 * H))
        for wy in range(top + step // 2, y_sidewalk - step, step):
            for wx in range(x + step // 2, x + bw - step // 2, step):
                tex[wy:wy + step // 2, wx:wx + max(2, step // 3)] *= 0.45
        x += bw
    add(tex, mask, BUILDING, 0.7)

    # trees (crown + trunk, vegetation) and poles, a little in front of the facades
    tex = _texture(rng, h, w, (70, 120, 50), amp=35.0)
    label = np.zeros((h, w), np.uint8)
    for _ in range(max(2, int(rng.integers(2, 5) * W / 256))):
        cx, cy = rng.uniform(0, w), rng.uniform(0.25, 0.42) * H + g.my
        rx, ry = rng.uniform(0.04, 0.08) * W + 2, rng.uniform(0.1, 0.16) * H + 2
        label[_ellipse(h, w, cx, cy, rx, ry)] = VEGETATION
        tw = max(2, int(0.012 * W))
        label[int(cy):y_sidewalk + 2, max(0, int(cx) - tw // 2):max(0, int(cx) + tw - tw // 2)] = VEGETATION
    for _ in range(int(rng.integers(1, 3))):
        px, pw = int(rng.uniform(0, w - 4)), max(2, int(0.008 * W))
        top = int(rng.uniform(0.2, 0.35) * H) + g.my
        label[top:y_sidewalk + 2, px:px + pw] = POLE
        tex[top:y_sidewalk + 2, px:px + pw] = _texture(rng, y_sidewalk + 2 - top, pw, (120, 120, 125), 20.0)
    add(tex, label > 0, label, 1.0)

    # sidewalk with paving joints, then the road with lane dashes in front of it
    tex = _texture(rng, h, w, (175, 140, 150), amp=22.0)
    tile = max(3, int(0.05 * H))
    tex[y_sidewalk::tile] *= 0.7
    tex[:, ::2 * tile] *= 0.8
    mask = np.zeros((h, w), bool)
    mask[y_sidewalk:] = True
    add(tex, mask, SIDEWALK, 1.0)

    tex = _texture(rng, h, w, (85, 85, 90), amp=20.0)
    lane_y, dash = int(0.83 * H) + g.my, max(4, int(0.06 * W))
    for x in range(int(rng.uniform(0, dash)), w, 2 * dash):
        tex[lane_y:lane_y + max(1, H // 64) + 1, x:x + dash] = 230.0
    mask = np.zeros((h, w), bool)
    mask[y_road:] = True
    add(tex, mask, ROAD, 1.0)
    return layers


def _pedestrian(rng, g: _Frame, cam, t: np.ndarray, inst: int) -> _Layer:
    H, W = g.height, g.width
    ph = int(rng.uniform(0.2, 0.28) * H) + 4
    pw = max(4, int(0.32 * ph))
    body = _ellipse(ph, pw, (pw - 1) / 2, 0.6 * ph, pw / 2, 0.42 * ph)
    head = _ellipse(ph, pw, (pw - 1) / 2, 0.12 * ph, 0.3 * pw, 0.12 * ph)
    tex = _texture(rng, ph, pw, rng.uniform(30, 220, 3), amp=35.0)
    tex[head] = _texture(rng, ph, pw, (200, 160, 130), amp=15.0)[head]
    mask = body | head
    foot = rng.uniform(0.62, 0.72) * H
    x0 = rng.uniform(0.05, 0.9) * W
    vx = rng.choice([-1, 1]) * rng.uniform(0.2, 0.7) * W / 256
    offsets = np.stack([x0 + vx * t, np.full_like(t, foot - ph)], -1) + cam
    return _Layer(np.clip(tex, 0, 255), mask, np.where(mask, PERSON, 0).astype(np.uint8), inst, offsets)


def _car(rng, g: _Frame, cam, t: np.ndarray, inst: int, bottom: float, x0: float) -> _Layer:
    H, W = g.height, g.width
    depth = np.clip((bottom - 0.68 * H) / (0.35 * H), 0, 1)  # lower in the image = closer = bigger
    cw = int((0.22 + 0.12 * depth) * W * rng.uniform(0.85, 1.15)) + 6
    ch = int(0.45 * cw) + 4
    ys, xs = np.mgrid[0:ch, 0:cw]
    body = (ys >= 0.4 * ch) & (ys < 0.88 * ch)
    cabin = (ys >= 0.08 * ch) & (ys < 0.42 * ch) & (xs >= 0.2 * cw) & (xs < 0.78 * cw)
    r = 0.12 * ch
    wheels = _ellipse(ch, cw, 0.22 * cw, ch - r - 1, r, r) | _ellipse(ch, cw, 0.78 * cw, ch - r - 1, r, r)
    tex = _texture(rng, ch, cw, rng.uniform(20, 230, 3), amp=30.0)
    tex[cabin] = _texture(rng, ch, cw, (60, 80, 110), amp=25.0)[cabin]
    tex[wheels] = _texture(rng, ch, cw, (30, 30, 30), amp=12.0)[wheels]
    mask = body | cabin | wheels
    vx = rng.choice([-1, 1]) * rng.uniform(0.6, 2.5) * W / 256
    offsets = np.stack([x0 + vx * t, np.full_like(t, bottom - ch)], -1) + cam
    return _Layer(np.clip(tex, 0, 255), mask, np.where(mask, CAR, 0).astype(np.uint8), inst, offsets)


# ---------------------------------------------------------------------------------------------------
# rendering


def _bilinear(tex: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample ``tex`` at float coordinates (u=x, v=y), clamped at the border."""
    h, w = tex.shape[:2]
    u = np.clip(u, 0, w - 1)
    v = np.clip(v, 0, h - 1)
    x0 = np.minimum(np.floor(u).astype(np.int64), w - 2) if w > 1 else np.zeros(u.shape, np.int64)
    y0 = np.minimum(np.floor(v).astype(np.int64), h - 2) if h > 1 else np.zeros(v.shape, np.int64)
    fx = (u - x0)[..., None].astype(np.float32)
    fy = (v - y0)[..., None].astype(np.float32)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    top = tex[y0, x0] * (1 - fx) + tex[y0, x1] * fx
    bot = tex[y1, x0] * (1 - fx) + tex[y1, x1] * fx
    return top * (1 - fy) + bot * fy


def _render(layers: list[_Layer], t: int, width: int, height: int):
    colour = np.zeros((height, width, 3), np.float32)
    label = np.zeros((height, width), np.uint8)
    inst = np.full((height, width), BACKGROUND_INSTANCE, np.uint8)
    surface = np.full((height, width), -1, np.int32)
    flow = np.zeros((height, width, 2), np.float32)
    for index, layer in enumerate(layers):
        ox, oy = layer.offsets[t]
        h, w = layer.mask.shape
        x_lo, x_hi = max(0, int(np.floor(ox)) - 1), min(width, int(np.ceil(ox + w)) + 1)
        y_lo, y_hi = max(0, int(np.floor(oy)) - 1), min(height, int(np.ceil(oy + h)) + 1)
        if x_lo >= x_hi or y_lo >= y_hi:
            continue
        ys, xs = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        u, v = xs - ox, ys - oy  # layer coordinates of the frame pixels
        iu, iv = np.floor(u + 0.5).astype(np.int64), np.floor(v + 0.5).astype(np.int64)
        inside = (iu >= 0) & (iu < w) & (iv >= 0) & (iv < h)
        covered = np.zeros_like(inside)
        covered[inside] = layer.mask[iv[inside], iu[inside]]
        if not covered.any():
            continue
        py, px = ys[covered], xs[covered]
        colour[py, px] = _bilinear(layer.texture, u[covered], v[covered])
        label[py, px] = layer.label[iv[covered], iu[covered]]
        inst[py, px] = layer.instance
        surface[py, px] = index
        if t > 0:
            flow[py, px] = (layer.offsets[t - 1] - layer.offsets[t]).astype(np.float32)
    frame = np.clip(np.round(colour), 0, 255).astype(np.uint8)
    return frame, label, inst, surface, flow


def _valid(flow: np.ndarray, surface: np.ndarray, prev_surface: np.ndarray) -> np.ndarray:
    """Where the exact flow lands inside the image on the same layer (all bilinear neighbours)."""
    h, w = surface.shape
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    tx, ty = xs + flow[..., 0], ys + flow[..., 1]
    ok = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    tx, ty = np.clip(tx, 0, w - 1), np.clip(ty, 0, h - 1)
    for nx in (np.floor(tx), np.ceil(tx)):
        for ny in (np.floor(ty), np.ceil(ty)):
            ok &= prev_surface[ny.astype(np.int64), nx.astype(np.int64)] == surface
    return ok


def make_sequence(num_frames: int, width: int, height: int, seed: int,
                  motion: str = "subpixel") -> SyntheticSequence:
    """One deterministic street scene of ``num_frames`` frames at ``width`` x ``height``.

    ``motion``: ``"subpixel"`` (default) or ``"integer"`` (every layer offset rounded to whole pixels,
    so that warping with the exact flow is bit-exact on valid pixels).
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if width < MIN_SIZE or height < MIN_SIZE:
        raise ValueError(f"synthetic scenes need width and height >= {MIN_SIZE}, got {width}x{height}")
    if motion not in ("subpixel", "integer"):
        raise ValueError(f"motion must be 'subpixel' or 'integer', got {motion!r}")
    rng = np.random.default_rng(seed)
    t = np.arange(num_frames, dtype=np.float64)
    pan = rng.choice([-1, 1]) * rng.uniform(0.3, 1.2) * width / 256
    bob = rng.uniform(0.2, 0.6) * height / 128 * np.sin(2 * np.pi * t / rng.uniform(8, 16))
    cam = np.stack([pan * t, bob], -1)
    g = _Frame(width, height, mx=int(np.ceil(np.abs(cam[:, 0]).max())) + 4,
               my=int(np.ceil(np.abs(cam[:, 1]).max())) + 4)

    layers = _background(rng, g, cam)
    inst = 1
    peds = []
    for _ in range(int(rng.integers(1, 4))):
        peds.append(_pedestrian(rng, g, cam, t, inst))
        inst += 1
    layers += sorted(peds, key=lambda p: p.offsets[0, 1] + p.mask.shape[0])  # farther (higher) first
    cars = []
    for i in range(int(rng.integers(2, 5))):
        bottom = rng.uniform(0.8, 1.05) * height
        x0 = rng.uniform(0.1, 0.5) * width if i == 0 else rng.uniform(-0.2, 0.9) * width
        cars.append(_car(rng, g, cam, t, inst, bottom, x0))
        inst += 1
    layers += sorted(cars, key=lambda c: c.offsets[0, 1] + c.mask.shape[0])
    if motion == "integer":
        for layer in layers:
            layer.offsets = np.round(layer.offsets)

    frames = np.zeros((num_frames, height, width, 3), np.uint8)
    labels = np.zeros((num_frames, height, width), np.uint8)
    instances = np.zeros((num_frames, height, width), np.uint8)
    flow = np.zeros((num_frames, height, width, 2), np.float32)
    valid = np.zeros((num_frames, height, width), bool)
    prev_surface = None
    for k in range(num_frames):
        frames[k], labels[k], instances[k], surface, flow[k] = _render(layers, k, width, height)
        if k > 0:
            valid[k] = _valid(flow[k], surface, prev_surface)
        prev_surface = surface
    return SyntheticSequence(frames, labels, instances, flow, f"synthetic_seed{seed}", valid)


def make_dataset(num_sequences: int, num_frames: int, width: int, height: int,
                 seed: int = 0) -> list[SyntheticSequence]:
    """``num_sequences`` independent scenes; sequence ``i`` is seeded from ``(seed, i)``."""
    if num_sequences < 1:
        raise ValueError(f"num_sequences must be >= 1, got {num_sequences}")
    out = []
    for i in range(num_sequences):
        sub = int(np.random.SeedSequence([seed, i]).generate_state(1)[0])
        seq = make_sequence(num_frames, width, height, sub)
        seq.name = f"synthetic_{seed}_{i:04d}"
        out.append(seq)
    return out
