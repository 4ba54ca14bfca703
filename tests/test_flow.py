"""Flow estimators (DIS, RAFT-small), warping, forward-backward confidence and the RAFT loader."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from scipy.ndimage import map_coordinates

from vid2vid.datasets.flow import FlowEstimator, estimate_flow, flow_confidence, warp_image_np
from vid2vid.datasets.raft import NUM_PARAMETERS, RAFTSmall, load_raft_small
from vid2vid.datasets.synthetic import make_sequence

# Thresholds from measurements at 128x64 (mean EPE over all pixels, seeds 0-2): DIS 0.11-0.19 px,
# RAFT-small 0.26-0.27 px. About 3x margin.
DIS_EPE_MAX, RAFT_EPE_MAX = 0.5, 0.8


def _smooth_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (h // 6 + 2, w // 6 + 2, 3)).astype(np.float32)
    return np.clip(cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC), 0, 255).astype(np.uint8)


def _translated_pair(dx: int, dy: int, h: int = 64, w: int = 128):
    """img2(p + (dx, dy)) = img1(p): crops of one larger image."""
    big = _smooth_image(h + 40, w + 40)
    img1 = big[20:20 + h, 20:20 + w]
    img2 = big[20 - dy:20 - dy + h, 20 - dx:20 - dx + w]
    return np.ascontiguousarray(img1), np.ascontiguousarray(img2)


def _epe(seq, estimator, frames=(1, 2)) -> float:
    errs = [np.linalg.norm(estimator(seq.frames[t], seq.frames[t - 1]) - seq.flow[t], axis=-1).mean()
            for t in frames]
    return float(np.mean(errs))


# ---------------------------------------------------------------------------------------------------
# warping and confidence


def test_warp_image_convention():
    img = _smooth_image(32, 48)
    flow = np.zeros((32, 48, 2), np.float32)
    flow[..., 0] = 2.0  # out(p) = img(p + (2, 0))
    out = warp_image_np(img, flow)
    np.testing.assert_array_equal(out[:, :-2], img[:, 2:])
    np.testing.assert_array_equal(out[:, -2:], np.repeat(img[:, -1:], 2, axis=1))  # border replicate
    with pytest.raises(ValueError, match="same height and width"):
        warp_image_np(img, flow[:16])


def test_flow_confidence_matches_independent_computation():
    rng = np.random.default_rng(0)
    h, w = 24, 32
    fw = cv2.resize(rng.normal(0, 3, (4, 5, 2)).astype(np.float32), (w, h))
    bw = -fw + cv2.resize(rng.normal(0, 1, (4, 5, 2)).astype(np.float32), (w, h))
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    tx, ty = xs + fw[..., 0], ys + fw[..., 1]
    bw_t = np.stack([map_coordinates(bw[..., c], [ty, tx], order=1, mode="nearest") for c in (0, 1)], -1)
    lhs = ((fw + bw_t) ** 2).sum(-1)
    rhs = 0.01 * ((fw**2).sum(-1) + (bw_t**2).sum(-1)) + 0.5
    inside = (tx >= 0) & (tx <= w - 1) & (ty >= 0) & (ty <= h - 1)
    expected = (lhs < rhs) & inside
    got = flow_confidence(fw, bw)
    assert got.dtype == np.float32 and set(np.unique(got)) <= {0.0, 1.0}
    clear = np.abs(lhs - rhs) > 0.05  # leave out pixels on the threshold (interpolation rounding)
    np.testing.assert_array_equal(got[clear] > 0, expected[clear])
    assert 0.1 < expected.mean() < 0.9  # the case is not trivial


def test_flow_confidence_translation():
    fw = np.zeros((16, 20, 2), np.float32)
    fw[..., 0] = 3.0
    conf = flow_confidence(fw, -fw)
    assert conf[:, :17].all() and not conf[:, 17:].any()  # targets past x = 19 leave the image
    assert not flow_confidence(fw, fw).any()  # a backward flow that does not come back


# ---------------------------------------------------------------------------------------------------
# input validation and the convention of estimate_flow


def test_estimate_flow_rejects_bad_input(tmp_path):
    img = _smooth_image(32, 48)
    with pytest.raises(ValueError, match="uint8"):
        estimate_flow(img.astype(np.float32), img)
    with pytest.raises(ValueError, match="HxWx3"):
        estimate_flow(img[..., 0], img)
    with pytest.raises(ValueError, match="same size"):
        estimate_flow(img, img[:16])
    with pytest.raises(ValueError, match="unknown flow method"):
        estimate_flow(img, img, method="farneback")
    with pytest.raises(ValueError, match="weights_path"):
        estimate_flow(img, img, method="raft")
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        estimate_flow(img, img, method="raft", weights_path=tmp_path / "nothere.pth")


@pytest.mark.parametrize("dx, dy", [(3, -2), (-4, 1)])
def test_dis_translation_sign(dx, dy):
    img1, img2 = _translated_pair(dx, dy)
    flow = estimate_flow(img1, img2)
    assert flow.shape == (64, 128, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(np.median(flow[8:-8, 8:-8].reshape(-1, 2), 0), [dx, dy], atol=0.25)
    back = warp_image_np(img2, flow).astype(int)  # img1(p) ~ img2(p + flow(p))
    assert np.abs(back - img1)[8:-8, 8:-8].mean() < 2.0


def test_dis_epe_on_synthetic():
    seq = make_sequence(3, 128, 64, seed=0)
    epe = _epe(seq, FlowEstimator("dis"))
    print(f"\nDIS EPE on synthetic 128x64: {epe:.3f} px")
    assert epe < DIS_EPE_MAX


def test_estimator_pair():
    seq = make_sequence(2, 128, 64, seed=2)
    est = FlowEstimator("dis")
    pair = est.pair(seq.frames[1], seq.frames[0])
    np.testing.assert_array_equal(pair.forward, est(seq.frames[1], seq.frames[0]))
    np.testing.assert_array_equal(pair.backward, est(seq.frames[0], seq.frames[1]))
    np.testing.assert_array_equal(pair.confidence, flow_confidence(pair.forward, pair.backward))
    # where the true flow is measurable DIS is consistent; disoccluded pixels are flagged more often
    conf, valid = pair.confidence > 0, seq.valid[1]
    assert conf[valid].mean() > 0.98
    assert conf[~valid].mean() < conf[valid].mean() - 0.1


# ---------------------------------------------------------------------------------------------------
# RAFT-small loader


def _save_state(path, state):
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path


def test_raft_official_checkpoint_loads_strictly(raft_weights):
    model = load_raft_small(raft_weights)
    assert sum(p.numel() for p in model.parameters()) == NUM_PARAMETERS == 990_162
    raw = torch.load(raft_weights, map_location="cpu", weights_only=True)
    assert len(raw) == 106 and all(k.startswith("module.") for k in raw)
    assert not model.training


def test_raft_loader_errors_name_the_key(tmp_path):
    state = RAFTSmall().state_dict()
    renamed = dict(state)
    renamed["update_block.gru.convz_x.weight"] = renamed.pop("update_block.gru.convz.weight")
    with pytest.raises(ValueError, match="convz_x.weight"):
        load_raft_small(_save_state(tmp_path / "renamed.pth", renamed))
    missing = {k: v for k, v in state.items() if k != "fnet.conv2.bias"}
    with pytest.raises(ValueError, match="missing key 'fnet.conv2.bias'"):
        load_raft_small(_save_state(tmp_path / "missing.pth", missing))
    wrong = dict(state, **{"cnet.conv2.weight": torch.zeros(161, 96, 1, 1)})
    with pytest.raises(ValueError, match=r"cnet\.conv2\.weight.*\(161, 96, 1, 1\)"):
        load_raft_small(_save_state(tmp_path / "shape.pth", wrong))
    ok = load_raft_small(_save_state(tmp_path / "ok.pth", state))
    assert isinstance(ok, RAFTSmall)


class NotATensor:
    pass


def test_raft_loader_refuses_non_tensors(tmp_path):
    torch.save({"module.fnet.conv1.weight": NotATensor()}, tmp_path / "obj.pth")
    with pytest.raises(ValueError, match="weights_only"):
        load_raft_small(tmp_path / "obj.pth")
    state = dict(RAFTSmall().state_dict(), **{"fnet.conv1.bias": "bias"})
    with pytest.raises(ValueError, match="'fnet.conv1.bias' holds a str"):
        load_raft_small(_save_state(tmp_path / "str.pth", state))
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="state dict"):
        load_raft_small(tmp_path / "list.pth")


def test_raft_pads_small_odd_sizes():
    model = RAFTSmall().eval()
    img = torch.rand(2, 3, 37, 53) * 255
    with torch.no_grad():
        flow = model(img, img.flip(-1), iters=2)
    assert flow.shape == (2, 2, 37, 53) and torch.isfinite(flow).all()
    with pytest.raises(ValueError, match="equal shape"):
        model(img, img[:, :, :30])


# ---------------------------------------------------------------------------------------------------
# RAFT-small with the official weights


@pytest.fixture(scope="module")
def raft(raft_weights):
    return FlowEstimator("raft", raft_weights)


def test_raft_translation_sign(raft):
    dx, dy = 5, -3
    img1, img2 = _translated_pair(dx, dy, h=60, w=100)  # not a multiple of 8: padded, then cropped
    flow = raft(img1, img2)
    assert flow.shape == (60, 100, 2) and flow.dtype == np.float32
    np.testing.assert_allclose(np.median(flow[8:-8, 8:-8].reshape(-1, 2), 0), [dx, dy], atol=0.3)


def test_raft_epe_on_synthetic(raft):
    seq = make_sequence(3, 128, 64, seed=0)
    epe = _epe(seq, raft)
    print(f"\nRAFT-small EPE on synthetic 128x64: {epe:.3f} px")
    assert epe < RAFT_EPE_MAX


def _load_rgb(path, size=(256, 128)):
    img = cv2.imread(str(path), cv2.IMREAD_REDUCED_COLOR_4)  # decode 2048x1024 at 512x256
    assert img is not None, f"cannot read {path}"
    return cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), size, interpolation=cv2.INTER_AREA)


def test_warping_error_on_cityscapes(sample_data, raft):
    """Mean |warp(next, flow(cur -> next)) - cur| on pixels both methods find confident.

    Measured at 256x128 over 8 pairs: DIS 2.2-5.5, RAFT-small 3.5-8.5 grey levels (zero flow: ~10).
    DIS wins on this photometric metric: it minimises brightness constancy directly, at full
    resolution, while RAFT-small predicts at 1/8 resolution and upsamples bilinearly. So the test
    asserts that both explain most of the motion, not an ordering.
    """
    root = sample_data / "cityscapes_sample" / "train_B"
    estimators = {"dis": FlowEstimator("dis"), "raft": raft}
    for seq_dir, i in (("seq0000", 0), ("seq0002", 10)):
        files = sorted((root / seq_dir).glob("*.jpg"))
        cur, nxt = _load_rgb(files[i]), _load_rgb(files[i + 1])
        pairs = {name: est.pair(cur, nxt) for name, est in estimators.items()}
        both = (pairs["dis"].confidence > 0) & (pairs["raft"].confidence > 0)
        assert both.mean() > 0.3, f"{seq_dir}: only {both.mean():.0%} pixels confident for both"
        zero = np.abs(nxt.astype(float) - cur)[both].mean()
        line = f"\n{seq_dir} frame {i}: confident {both.mean():.0%}, zero-flow error {zero:.2f}"
        for name, pair in pairs.items():
            err = np.abs(warp_image_np(nxt, pair.forward).astype(float) - cur).mean(-1)
            own = err[pair.confidence > 0].mean()
            line += f"; {name}: {err[both].mean():.2f} (own mask {own:.2f}, {pair.confidence.mean():.0%})"
            assert err[both].mean() < 0.6 * zero, f"{seq_dir} {name}: warping barely beats zero flow"
        print(line)
