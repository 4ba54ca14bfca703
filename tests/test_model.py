"""The composed model: ablation switches, a full training step, phi_V frame selection, first frames."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from vid2vid.config import ModelConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide, judge
from vid2vid.models.objective import Objective
from vid2vid.models.sampling import compose_backward_flows, sample_video_window, video_window_flows
from vid2vid.models.vid2vid import GeneratorSide, count_parameters, generate_sequence, prepare_inputs
from vid2vid.training.engine import PlainEngine
from vid2vid.training.inputs import clip_inputs
from vid2vid.training.step import adversarial_inputs, colocated_step

H, W, T, N = 32, 64, 5, 1


def tiny(**kw) -> ModelConfig:
    base = dict(ngf=8, n_downsample_G=2, n_blocks=2, n_blocks_local=1, ndf=8, n_layers_D=2, num_D=1,
                n_scales_temporal=2, n_frames_D=2, label_nc=35)
    base.update(kw)
    return ModelConfig(**base)


def make_clip(seed: int = 0, t: int = T) -> Clip:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 35, (N, t, H, W), generator=g)
    labels[:, :, 8:16, 8:24] = 26  # a car, so the foreground prior has pixels to work on
    instances = torch.zeros(N, t, H, W, dtype=torch.long)
    instances[:, :, 8:16, 8:24] = 1
    edges = torch.zeros(N, t, H, W)
    edges[:, :, 8, 8:24] = 1
    frames = torch.rand(N, t, 3, H, W, generator=g) * 2 - 1
    flow = torch.randn(N, t, 2, H, W, generator=g)
    flow[:, 0] = 0
    conf = torch.ones(N, t, 1, H, W)
    conf[:, 0] = 0
    return Clip(labels, edges, instances, frames, flow, conf)


def engines(cfg: ModelConfig, seed: int = 0):
    torch.manual_seed(seed)
    g, d = GeneratorSide(cfg), DiscriminatorSide(cfg)
    ge = PlainEngine(g, torch.optim.Adam(g.parameters(), lr=1e-3, betas=(0.5, 0.999)))
    de = PlainEngine(d, torch.optim.Adam(d.parameters(), lr=1e-3, betas=(0.5, 0.999)))
    return ge, de


def step(cfg: ModelConfig, seed: int = 0):
    ge, de = engines(cfg, seed)
    before = {k: v.clone() for k, v in ge.module.state_dict().items()}
    result = colocated_step(ge, de, Objective(cfg), cfg, make_clip(seed), T, torch.Generator().manual_seed(seed))
    changed = any(not torch.equal(before[k], v) for k, v in ge.module.state_dict().items())
    return ge, de, result, changed


def test_full_model_trains_a_step_with_every_term():
    cfg = tiny()
    ge, de, result, changed = step(cfg)
    g_terms, d_terms = set(result.generator.terms), set(result.discriminator.terms)
    assert {"flow_endpoint", "flow_warp", "temporal_warp", "image_gan", "image_feat", "image_raw_gan",
            "video0_gan", "video0_feat", "video1_gan", "video1_feat"} <= g_terms
    assert {"image", "image_raw", "video0", "video1"} <= d_terms
    assert all(torch.isfinite(v) for v in result.generator.terms.values())
    assert changed
    assert result.frames == N * T


@pytest.mark.parametrize(
    "switch, gone_modules, gone_terms",
    [
        ("fg_bg_prior", "fg_", set()),
        ("flow_warping", "flow_", {"flow_endpoint", "flow_warp", "temporal_warp", "image_raw_gan", "image_raw_feat"}),
        ("video_discriminator", None, {"video0_gan", "video0_feat", "video1_gan", "video1_feat"}),
    ],
)
def test_each_ablation_removes_its_parameters_and_loss_terms(switch, gone_modules, gone_terms):
    full, ablated = tiny(), tiny(**{switch: False})
    g_full, g_abl = GeneratorSide(full), GeneratorSide(ablated)
    d_full, d_abl = DiscriminatorSide(full), DiscriminatorSide(ablated)
    if gone_modules:
        assert any(gone_modules in n for n, _ in g_full.named_parameters())
        assert not any(gone_modules in n for n, _ in g_abl.named_parameters())
        assert count_parameters(g_abl) < count_parameters(g_full)
    if switch == "video_discriminator":
        assert d_abl.video is None and count_parameters(d_abl) < count_parameters(d_full)
    _, _, result, changed = step(ablated)
    assert changed, "the ablated model must still train"
    assert not gone_terms & set(result.generator.terms)
    if switch == "video_discriminator":
        assert not any(k.startswith("video") for k in result.discriminator.terms)


def test_flow_ablation_outputs_hallucination_only():
    cfg = tiny(flow_warping=False)
    g = GeneratorSide(cfg)
    clip = make_clip()
    seq = generate_sequence(g, cfg, prepare_inputs(cfg, clip.labels, clip.instance_edges), 3)
    assert seq.flows is None and seq.masks is None
    assert torch.equal(seq.frames, seq.hallucinated)


def test_first_frames_come_from_the_generator_itself():
    """Frame 0 uses the no-previous-frame path; frame 1 sees frame 0 (the only one there is)."""
    cfg = tiny()
    g = GeneratorSide(cfg).eval()
    clip = make_clip()
    inputs = prepare_inputs(cfg, clip.labels, clip.instance_edges)
    seq = generate_sequence(g, cfg, inputs, 3)
    assert seq.frames.shape == (N, 3, 3, H, W)
    with torch.no_grad():
        first = g(inputs.source[:, [0, 0, 0]], None, inputs.label_ids[:, 0])
        second = g(inputs.source[:, [0, 0, 1]], torch.stack([seq.frames[:, 0]] * 2, 1), inputs.label_ids[:, 1])
    torch.testing.assert_close(seq.frames[:, 0], first.frame)
    torch.testing.assert_close(seq.frames[:, 1], second.frame)
    assert first.flow is None and second.flow is not None


def test_video_discriminator_sees_exactly_the_frames_its_step_selects(monkeypatch):
    cfg = tiny(n_frames_D=3, n_scales_temporal=2)
    d = DiscriminatorSide(cfg)
    clip = make_clip(t=9)
    fake = torch.rand(N, 9, 3, H, W) * 2 - 1
    seq = type("Seq", (), {"frames": fake, "hallucinated": fake})()
    adv = adversarial_inputs(cfg, clip_inputs(cfg, clip, 9), seq, torch.Generator().manual_seed(3))
    seen = {}

    def spy(frames, flows, scale):
        seen[scale] = (frames.clone(), flows.clone())
        return original(frames, flows, scale)

    original = d.video.forward
    monkeypatch.setattr(d.video, "forward", spy)
    judge(d, adv)
    for scale, window in enumerate(adv.video_windows):
        step_s = 3**scale
        assert window == list(range(window[0], window[0] + 3 * step_s, step_s))
        frames, flows = seen[scale]
        assert torch.equal(frames[:N], clip.frames[:, window])  # real half
        assert torch.equal(frames[N:], fake[:, window])  # fake half
        assert torch.equal(flows[:N], video_window_flows(clip.flow, window))


def test_phi_v_windows_cover_every_start_and_skip_short_clips():
    g = torch.Generator().manual_seed(0)
    starts = {sample_video_window(10, 3, 3, g)[0] for _ in range(200)}
    assert starts == {0, 1, 2, 3}  # span 7 frames in a 10-frame clip
    assert sample_video_window(6, 3, 3, g) is None


def test_composed_flow_of_translations_adds_up():
    flows = torch.zeros(1, 4, 2, 16, 16)
    flows[:, 1:, 0] = -1.0  # every frame moved one pixel right: frame t maps to t-1 one pixel left
    flows[:, 1:, 1] = -2.0
    composed = compose_backward_flows(flows, 0, 3)
    assert torch.allclose(composed[:, 0], torch.full((1, 16, 16), -3.0))
    assert torch.allclose(composed[:, 1], torch.full((1, 16, 16), -6.0))


def test_multimodal_features_feed_the_generator():
    """With use_features, E is trained through G's losses (its weights move in a step)."""
    cfg = tiny(use_features=True)
    ge, de = engines(cfg)
    before = [p.clone() for p in ge.module.encoder.parameters()]
    colocated_step(ge, de, Objective(cfg), cfg, make_clip(), T, torch.Generator().manual_seed(0))
    assert any(not torch.equal(a, b) for a, b in zip(before, ge.module.encoder.parameters(), strict=True))


def test_objective_terms_follow_config_weights():
    """Doubling lambda_feat doubles the feature-matching terms on the same inputs."""
    cfg = tiny()
    clip = make_clip()
    torch.manual_seed(0)
    d = DiscriminatorSide(cfg)
    fake = torch.rand(N, T, 3, H, W) * 2 - 1
    seq = type("Seq", (), {"frames": fake, "hallucinated": fake})()
    adv = adversarial_inputs(cfg, clip_inputs(cfg, clip, T), seq, torch.Generator().manual_seed(0))
    j = judge(d, adv)
    a = Objective(cfg).generator_adversarial(j).terms
    b = Objective(dataclasses.replace(cfg, lambda_feat=20.0)).generator_adversarial(j).terms
    torch.testing.assert_close(b["image_feat"], 2 * a["image_feat"])
    torch.testing.assert_close(b["image_gan"], a["image_gan"])


def test_edge_maps_feed_the_generator_as_one_dense_channel():
    """Edge->video shards store (N, T, H, W) 0/1 edges; G sees them as one channel (no one-hot)."""
    cfg = tiny(label_nc=0, input_nc=1, use_instance=False, fg_bg_prior=False)
    edges = (torch.rand(N, T, H, W) > 0.8).long()
    inputs = prepare_inputs(cfg, edges, None)
    assert inputs.source.shape == (N, T, 1, H, W) and inputs.label_ids is None
    assert torch.equal(inputs.source[:, :, 0], edges.float())
    seq = generate_sequence(GeneratorSide(cfg), cfg, inputs, 2)
    assert seq.frames.shape == (N, 2, 3, H, W)
