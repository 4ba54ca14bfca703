"""Ground-truth optical flow for the prepare step: OpenCV DIS (CPU default) or RAFT-small.

Convention everywhere in this package (Middlebury): ``flow = estimate_flow(img1, img2)`` maps each
pixel ``p`` of ``img1`` to its position in ``img2``, so ``img1(p) ~ img2(p + flow(p))`` and
``warp_image_np(img2, flow) ~ img1``. vid2vid needs the *backward* flow of a video (current frame ->
previous frame, used to warp the previous frame onto the current one), i.e.
``estimate_flow(frame[t], frame[t - 1])``.

Flow is computed once, when shards are prepared, never in the train loop; :class:`FlowEstimator`
exists so a Ray Data actor loads RAFT once and reuses it for every pair.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

METHODS = ("dis", "raft")


@dataclass
class FlowPair:
    """Both directions between two frames plus the forward-backward confidence of ``forward``."""

    forward: np.ndarray  # HxWx2 float32, img1 -> img2
    backward: np.ndarray  # HxWx2 float32, img2 -> img1
    confidence: np.ndarray  # HxW float32 in {0, 1}, on img1's pixel grid


def _check_image(img: np.ndarray, name: str) -> None:
    if not isinstance(img, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array, got {type(img).__name__}")
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"{name}: expected an HxWx3 RGB image, got shape {img.shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"{name}: expected dtype uint8 (0..255 RGB), got {img.dtype}")
    if img.shape[0] < 2 or img.shape[1] < 2:
        raise ValueError(f"{name}: image of shape {img.shape} is too small for optical flow")


def _check_pair(img1: np.ndarray, img2: np.ndarray) -> None:
    _check_image(img1, "img1")
    _check_image(img2, "img2")
    if img1.shape != img2.shape:
        raise ValueError(f"img1 and img2 must have the same size, got {img1.shape} and {img2.shape}")


def _check_flow(flow: np.ndarray, name: str) -> None:
    if not isinstance(flow, np.ndarray) or flow.ndim != 3 or flow.shape[2] != 2:
        shape = getattr(flow, "shape", type(flow).__name__)
        raise ValueError(f"{name}: expected an HxWx2 flow array, got {shape}")


def _pixel_grid(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return xs, ys


def warp_image_np(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``out(p) = img(p + flow(p))``: bilinear (cv2.remap), border replicate; same dtype as ``img``.

    ``img`` is HxW or HxWxC (uint8 or float32); ``flow`` is HxWx2 in pixels on the output grid.
    """
    _check_flow(flow, "flow")
    if img.shape[:2] != flow.shape[:2]:
        raise ValueError(f"image {img.shape} and flow {flow.shape} must have the same height and width")
    xs, ys = _pixel_grid(*flow.shape[:2])
    map_x = xs + flow[..., 0].astype(np.float32)
    map_y = ys + flow[..., 1].astype(np.float32)
    return cv2.remap(np.ascontiguousarray(img), map_x, map_y, interpolation=cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def flow_confidence(flow_fw: np.ndarray, flow_bw: np.ndarray, alpha1: float = 0.01,
                    alpha2: float = 0.5) -> np.ndarray:
    """Forward-backward consistency (Sundaram et al., ECCV 2010) of ``flow_fw``: HxW float32 in {0,1}.

    With ``w_hat(p) = flow_bw(p + flow_fw(p))`` a pixel is confident when the round trip comes back,
    ``|fw + w_hat|^2 < alpha1 (|fw|^2 + |w_hat|^2) + alpha2``, and its target ``p + fw(p)`` lies inside
    the image (outside it the backward flow is only border-replicated, not measured).
    """
    _check_flow(flow_fw, "flow_fw")
    _check_flow(flow_bw, "flow_bw")
    if flow_fw.shape != flow_bw.shape:
        raise ValueError(f"flow_fw {flow_fw.shape} and flow_bw {flow_bw.shape} must have the same shape")
    fw = flow_fw.astype(np.float32)
    bw_at_target = warp_image_np(flow_bw.astype(np.float32), fw)
    round_trip = np.sum((fw + bw_at_target) ** 2, axis=-1)
    bound = alpha1 * (np.sum(fw**2, axis=-1) + np.sum(bw_at_target**2, axis=-1)) + alpha2
    h, w = fw.shape[:2]
    xs, ys = _pixel_grid(h, w)
    tx, ty = xs + fw[..., 0], ys + fw[..., 1]
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    return ((round_trip < bound) & inside).astype(np.float32)


def _dis_flow(img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
    # DIS on grayscale with the MEDIUM preset: on our synthetic scenes its EPE is 0.16-0.17 px against
    # 0.25-0.36 (FAST) and 0.29-0.39 (ULTRAFAST), since those skip the finest pyramid level; it costs
    # ~30 ms per 512x256 pair on one core, small next to decoding and resizing. (No finer preset exists.)
    dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
    g1 = cv2.cvtColor(np.ascontiguousarray(img1), cv2.COLOR_RGB2GRAY)
    g2 = cv2.cvtColor(np.ascontiguousarray(img2), cv2.COLOR_RGB2GRAY)
    return dis.calc(g1, g2, None).astype(np.float32)


@functools.lru_cache(maxsize=2)
def _cached_raft(path: str, mtime_ns: int, device: str):
    from vid2vid.datasets.raft import load_raft_small

    return load_raft_small(path, device=device)


def _raft_weights(weights_path) -> Path:
    if weights_path is None:
        raise ValueError("method='raft' needs weights_path: the official RAFT-small checkpoint "
                         "raft-small.pth (github.com/princeton-vl/RAFT, models.zip)")
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(f"RAFT-small weights not found: {path}")
    return path


class FlowEstimator:
    """Reusable flow estimator: RAFT is loaded once per object (one per Ray Data actor)."""

    def __init__(self, method: str = "dis", weights_path=None, device: str = "cpu", iters: int = 12):
        if method not in METHODS:
            raise ValueError(f"unknown flow method {method!r}; choose one of {METHODS}")
        self.method = method
        self.device = device
        self.iters = iters
        self.model = None
        if method == "raft":
            path = _raft_weights(weights_path)
            self.model = _cached_raft(str(path.resolve()), path.stat().st_mtime_ns, str(device))

    def _raft(self, first: list[np.ndarray], second: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        def batch(imgs):
            x = torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).float()
            return x.to(self.device)

        with torch.inference_mode():
            flow = self.model(batch(first), batch(second), iters=self.iters)
        flow = flow.permute(0, 2, 3, 1).float().cpu().numpy().astype(np.float32)
        return list(flow)

    def __call__(self, img1: np.ndarray, img2: np.ndarray) -> np.ndarray:
        """HxWx2 float32 flow img1 -> img2 in pixels (see the module docstring for the convention)."""
        _check_pair(img1, img2)
        if self.method == "dis":
            return _dis_flow(img1, img2)
        return self._raft([img1], [img2])[0]

    def pair(self, img1: np.ndarray, img2: np.ndarray) -> FlowPair:
        """Forward and backward flow and the confidence of the forward one (RAFT: one batch of 2)."""
        _check_pair(img1, img2)
        if self.method == "dis":
            fw, bw = _dis_flow(img1, img2), _dis_flow(img2, img1)
        else:
            fw, bw = self._raft([img1, img2], [img2, img1])
        return FlowPair(forward=fw, backward=bw, confidence=flow_confidence(fw, bw))


def estimate_flow(img1: np.ndarray, img2: np.ndarray, method: str = "dis", weights_path=None) -> np.ndarray:
    """HxWx2 float32 flow in pixels with ``img1(p) ~ img2(p + flow(p))``.

    ``img1``, ``img2``: HxWx3 uint8 RGB of equal size. ``method``: ``"dis"`` (OpenCV DIS, MEDIUM preset,
    on grayscale) or ``"raft"`` (RAFT-small, 12 iterations, on CPU; needs ``weights_path``; the loaded
    model is cached per checkpoint so repeated calls do not reload it).
    """
    if method not in METHODS:
        raise ValueError(f"unknown flow method {method!r}; choose one of {METHODS}")
    _check_pair(img1, img2)
    return FlowEstimator(method, weights_path)(img1, img2)
