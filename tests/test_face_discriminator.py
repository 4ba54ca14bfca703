"""The optional face discriminator of pose->body: head boxes from DensePose parts, crops, and its
terms in the G and D objectives (and in the split hand-off's message layout)."""

from __future__ import annotations

import pytest
import torch

from vid2vid.config import ConfigError, ModelConfig, apply_mapping
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide, judge
from vid2vid.models.face_crop import FaceBoxes, crop, crop_side, face_boxes
from vid2vid.models.objective import Objective
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.handoff import adversarial_names
from vid2vid.training.engine import PlainEngine
from vid2vid.training.inputs import clip_inputs
from vid2vid.training.step import adversarial_inputs, colocated_step

H, W, T = 64, 48, 3


def pose_sources(heads: list[tuple[int, int, int, int] | None], channels: int = 6) -> torch.Tensor:
    """Pose sources with a torso (part 2) everywhere but a head (part 23) in each given box."""
    src = torch.zeros(len(heads), channels, H, W)
    src[:, 2] = 2 / 24
    for i, box in enumerate(heads):
        if box is not None:
            y0, y1, x0, x1 = box
            src[i, 2, y0:y1, x0:x1] = 23 / 24
    return src


def test_boxes_centre_on_each_frames_head_and_stay_inside():
    src = pose_sources([(10, 20, 20, 30), (0, 4, 0, 4), (58, 64, 40, 48), None])
    boxes = face_boxes(src, 0.25)
    assert boxes.side == crop_side(H, 0.25) == 16
    assert boxes.found.tolist() == [True, True, True, False]
    # centre of rows 10..19 is 14 and of columns 20..29 is 24: the box starts 8 px before each
    assert boxes.top_left[0].tolist() == [6, 16]
    assert boxes.top_left[1].tolist() == [0, 0]  # clamped at the top-left corner
    assert boxes.top_left[2].tolist() == [H - 16, W - 16]  # clamped at the bottom-right corner
    with pytest.raises(ValueError, match="pose sources"):
        face_boxes(torch.zeros(1, 2, H, W), 0.25)


def test_crop_takes_each_images_own_square_and_passes_gradients():
    images = torch.randn(3, 3, H, W, requires_grad=True)
    boxes = FaceBoxes(torch.tensor([[0, 0], [5, 7], [48, 32]]), 16, torch.ones(3, dtype=torch.bool))
    out = crop(images, boxes)
    for i, (y, x) in enumerate(boxes.top_left.tolist()):
        assert torch.equal(out[i], images[i, :, y:y + 16, x:x + 16])
    out.sum().backward()
    assert images.grad.sum() == 3 * 3 * 16 * 16  # one gradient per cropped pixel, none outside


def pose_model(**kw) -> ModelConfig:
    base = dict(label_nc=0, input_nc=6, use_instance=False, fg_bg_prior=False, ngf=8, n_downsample_G=2,
                n_blocks=2, ndf=8, n_layers_D=2, num_D=3, n_scales_temporal=1, face_discriminator=True)
    return ModelConfig(**{**base, **kw})


def pose_clip(heads: bool = True) -> Clip:
    g = torch.Generator().manual_seed(0)
    labels = pose_sources([(8, 18, 16, 28) if heads else None] * T)[None]
    frames = torch.rand(1, T, 3, H, W, generator=g) * 2 - 1
    flow = torch.zeros(1, T, 2, H, W)
    conf = torch.ones(1, T, 1, H, W)
    conf[:, 0] = 0
    return Clip(labels, None, None, frames, flow, conf)


def test_face_terms_join_the_objective_and_only_the_face_region_feeds_them():
    cfg = pose_model()
    torch.manual_seed(0)
    g, d = GeneratorSide(cfg), DiscriminatorSide(cfg)
    assert len(d.face.net.scales) == 1  # max(1, num_D - 2), the reference's netD_f
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=1e-3))
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=1e-3))
    face0 = [p.detach().clone() for p in d.face.parameters()]
    objective = Objective(cfg)
    result = colocated_step(ge, de, objective, cfg, pose_clip(), T, torch.Generator().manual_seed(0))
    assert {"face_gan", "face_feat"} <= set(result.generator.terms) and "face" in result.discriminator.terms
    assert any(not torch.equal(a, b) for a, b in zip(face0, d.face.parameters(), strict=True))

    # The face GAN term's gradient w.r.t. the fake frames lives in the head's square of each judged frame.
    adv = adversarial_inputs(cfg, clip_inputs(cfg, pose_clip(), T), result.sequence, torch.Generator().manual_seed(1))
    fake = adv.fake.detach().requires_grad_(True)
    adv.fake = fake
    j = judge(d, adv)
    grad = torch.autograd.grad(objective.generator_adversarial(j).terms["face_gan"], fake)[0]
    inside = 0.0
    for t in adv.image_indices:
        box = face_boxes(adv.sources[:, t], cfg.face_crop)
        (y, x), s = box.top_left[0].tolist(), box.side
        frame_inside = grad[0, t, :, y:y + s, x:x + s].abs().sum().item()
        assert frame_inside > 0, t
        inside += frame_inside
    assert grad.abs().sum() == pytest.approx(inside)
    names = adversarial_names(adv, face=True)  # the split placement's layout matches the objective's
    assert names == (list(objective.generator_adversarial(j).terms), list(objective.discriminator(j).terms))


def test_frames_without_a_head_weigh_nothing():
    cfg = pose_model()
    torch.manual_seed(0)
    g, d = GeneratorSide(cfg), DiscriminatorSide(cfg)
    ge = PlainEngine(g, torch.optim.SGD(g.parameters(), lr=0.0))
    de = PlainEngine(d, torch.optim.SGD(d.parameters(), lr=0.0))
    result = colocated_step(ge, de, Objective(cfg), cfg, pose_clip(heads=False), T, torch.Generator().manual_seed(0))
    for name in ("face_gan", "face_feat"):
        assert result.generator.terms[name].item() == 0.0
    assert result.discriminator.terms["face"].item() == 0.0


def test_face_discriminator_needs_the_pose_source():
    with pytest.raises(ConfigError, match="model.face_discriminator: needs the pose source"):
        apply_mapping(ModelConfig(), {"face_discriminator": True})
    with pytest.raises(ConfigError, match="model.face_crop"):
        apply_mapping(pose_model(), {"face_crop": 1.5})
