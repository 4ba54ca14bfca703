"""Ray Train + DeepSpeed training on CPU (gloo): both placements, warm start, resume, fault tolerance,
the progressive schedule, MLflow.

Four runs of one progressive configuration carry most tests: colocated and split, each once
uninterrupted and once killed at every boundary of its schedule.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch

from vid2vid.checkpoints import save_weights
from vid2vid.config import load_config
from vid2vid.datasets.prepare import prepare
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.engines import load_weights_only
from vid2vid.platform.trainer import train
from vid2vid.training.faults import KillOnce
from vid2vid.training.sides import build_sides

pytestmark = pytest.mark.ray

# Two clips of 4 frames: two steps per epoch.
SMOKE = ["preset=smoke", "data.synthetic_sequences=1", "data.synthetic_frames=8", "data.clip_len=4",
         "train.n_frames_total=4", "train.max_frames_total=4"]

# Two spatial scales, two epochs of two steps. Epoch 0: coarse scale frozen, 2-frame clips, full rate;
# epoch 1: everything trains with a fresh optimizer, 4-frame clips, rate halved. A checkpoint each step.
PROGRESSIVE = ["model.n_scales_spatial=2", "train.niter_fix_global=1", "train.n_frames_total=2",
               "train.niter_step=1", "train.niter=1", "train.niter_decay=1", "train.max_steps=0",
               "train.checkpoint_every=1", "train.max_failures=5"]
# Killed after step 1 (mid-epoch, before the unfreeze and the clip doubling), after step 2 (the end of
# the epoch: the next step is the first with all scales, 4 frames and a decayed rate) and after step 3
# (mid-epoch, after them). max_failures leaves room for a restart a loaded CI machine may add (a
# worker lost to memory pressure): every restart resumes exactly, so the comparison still holds.
KILLS = (1, 2, 3)
PLACEMENT = {"colocated": ["train.num_workers=1", "train.zero_stage=2"],
             "split": ["train.num_workers=2", "train.placement=split", "train.zero_stage=1"]}


@pytest.fixture(scope="module")
def shards(ray_cluster, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "smoke"
    prepare(load_config([*SMOKE, f"data.out={out}"]).data, progress=False)
    return out


def smoke(tmp: Path, *extra: str):
    return load_config([*SMOKE, f"train.run_dir={tmp}", *extra])


def history(result, key: str) -> list[tuple[int, float]]:
    client = mlflow.tracking.MlflowClient(result.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(result.mlflow_run_id, key))


@pytest.fixture(scope="module")
def progressive(shards, tmp_path_factory):
    """``progressive(placement, killed)``: the result of that run (each run once per module)."""
    runs = {}

    def run(placement: str, killed: bool):
        if (placement, killed) not in runs:
            tmp = tmp_path_factory.mktemp(f"{placement}-{'killed' if killed else 'whole'}")
            hook = KillOnce(KILLS, str(tmp / "kills.json")) if killed else None
            result = train(smoke(tmp, *PROGRESSIVE, *PLACEMENT[placement]), shards, fault_hook=hook)
            runs[placement, killed] = result, tmp
        return runs[placement, killed]

    return run


def checkpoint_contents(directory: str | Path) -> dict[str, object]:
    """Every value of a checkpoint by path: plain weights, every DeepSpeed file (module, Adam moments
    and step counts, ZeRO's fp32 partitions, learning rates) and the JSON state files."""
    directory, out = Path(directory), {}

    def walk(value, key: str) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}/{k}")
        elif isinstance(value, list | tuple) and not hasattr(value, "_fields"):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
        else:
            out[key] = value

    for path in sorted(directory.rglob("*")):
        name = str(path.relative_to(directory))
        if path.suffix == ".pt":
            walk(load_weights_only(path), name)
        elif path.suffix == ".json" and path.name != "config.json":  # config: the run dirs differ
            walk(json.loads(path.read_text()), name)
    return out


def assert_same_training_state(got: dict, want: dict, rtol: float) -> None:
    assert sorted(got) == sorted(want)
    adam = [k for k in want if k.endswith(("exp_avg", "exp_avg_sq"))]
    assert adam, "no Adam moments found in the checkpoint"
    for key, value in want.items():
        if torch.is_tensor(value):
            scale = float(value.detach().abs().max()) if value.numel() else 0.0
            err = float((got[key].detach().double() - value.detach().double()).abs().max()) if value.numel() else 0.0
            assert err <= rtol * scale, f"{key}: max |diff| {err:.3g} (max |value| {scale:.3g})"
        elif hasattr(value, "__dict__"):  # DeepSpeed's LossScaler: a plain object
            assert vars(got[key]) == vars(value), key
        else:
            assert got[key] == value, key


@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_a_run_killed_at_each_schedule_boundary_ends_like_an_uninterrupted_one(progressive, placement):
    """Weights, Adam states (moments, step counts, ZeRO's fp32 copy), learning rates, schedule and the
    phi_I/phi_V generator state after the last step equal those of the run that was never killed."""
    whole, _ = progressive(placement, killed=False)
    killed, tmp = progressive(placement, killed=True)
    assert json.loads((tmp / "kills.json").read_text()) == list(KILLS), "the worker died at every boundary"
    want = checkpoint_contents(whole.checkpoint)
    assert any(k.startswith("ranks/0.json") for k in want)  # rank 0's phi_I/phi_V generator is in it
    assert_same_training_state(checkpoint_contents(killed.checkpoint), want, rtol=1e-6)
    # MLflow shows every step once, and each resume reported the weights it restored.
    assert [s for s, _ in history(killed, "step")] == [1, 2, 3, 4]
    assert {2, 3, 4} <= {s for s, _ in history(killed, "restored/g_weight_abs_sum")}


def test_progressive_schedule_grows_clips_freezes_then_fine_tunes_and_decays(progressive):
    result, _ = progressive("colocated", killed=False)
    assert [v for _, v in history(result, "clip_len")] == [2, 2, 4, 4]
    assert [v for _, v in history(result, "coarse_frozen")] == [1, 1, 0, 0]
    assert [v for _, v in history(result, "lr")] == [2e-4, 2e-4, 1e-4, 1e-4]
    # the coarse scale moved once unfrozen: compare with its seeded initialisation
    cfg = load_config([*SMOKE, *PROGRESSIVE])
    initial = build_sides(cfg, "both", torch.device("cpu"))[0].state_dict()
    final = torch.load(Path(result.checkpoint) / "generator" / "weights.pt", weights_only=True)
    coarse = [k for k in final if k.startswith("generator.scales.0.label_enc") and final[k].is_floating_point()]
    assert coarse and any(not torch.equal(final[k], initial[k]) for k in coarse)


def biases_cancelled_by_a_norm(module: torch.nn.Module) -> set[str]:
    """Conv biases that the instance norm right after them subtracts again: their gradient is zero but
    for rounding, so what Adam's normalised step makes of them is rounding noise, not training."""
    names = set()
    for prefix, seq in module.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            kids = list(seq.named_children())
            for (name, a), (_, b) in zip(kids, kids[1:], strict=False):
                if (isinstance(a, torch.nn.Conv2d | torch.nn.Conv3d) and a.bias is not None
                        and isinstance(b, torch.nn.InstanceNorm2d | torch.nn.InstanceNorm3d | torch.nn.BatchNorm2d)):
                    names.add(f"{prefix}.{name}.bias")
    return names


def test_split_placement_trains_like_colocated(progressive):
    """The real split worker code (hand-off, SplitGeneratorStep, discriminator_loop) on 1 G + 1 D rank
    against one colocated rank, same clips and seeds, through 4 steps of the progressive schedule (the
    unfreeze rebuilds G's engine, clips grow from 2 to 4 frames): same G and D weights, same losses."""
    runs = {p: progressive(p, killed=False)[0] for p in ("colocated", "split")}
    cfg = load_config([*SMOKE, *PROGRESSIVE])
    for side, module in zip(("generator", "discriminator"), build_sides(cfg, "both", torch.device("cpu")), strict=True):
        noise = biases_cancelled_by_a_norm(module)
        weights = {p: torch.load(Path(r.checkpoint) / side / "weights.pt", weights_only=True) for p, r in runs.items()}
        want = weights["colocated"]
        assert weights["split"].keys() == want.keys() and noise <= want.keys()
        trained = sorted(k for k in want if k not in noise and want[k].is_floating_point())
        initial = module.state_dict()
        split, colocated, start = (torch.cat([w[k].flatten() for k in trained])
                                   for w in (weights["split"], want, initial))
        # The whole vector: the placements differ only by float32 rounding (split G receives D's gradient
        # through a surrogate loss), which Adam's normalised step amplifies where gradients nearly vanish,
        # and whose size depends on the CPU's kernels (1.2e-5 of the weights' norm on one Xeon, under 1e-5
        # on another). A real difference (a loss term missing, doubled or stale in one placement) changes
        # the update itself: bounded at 1% of how far training moved the weights.
        apart, moved = float((split - colocated).norm()), float((colocated - start).norm())
        assert moved > 0 and apart <= 0.01 * moved, f"{side}: {apart:.3g} apart after moving {moved:.3g}"
        # Per tensor: a tensor trained in one placement only would be off by about one Adam step (~lr) per
        # element and step, i.e. by about as far as training moved it. Tensors that training barely moved
        # (norm biases a step or two after the unfreeze, whose tiny gradients are sums that nearly cancel)
        # may differ by rounding amplified in Adam's normalised step (g / (|g| + eps) for |g| near eps):
        # allowed up to 5% of one step per element, or 5% of how far the tensor moved.
        for name in trained + sorted(noise):
            diff = weights["split"][name] - want[name]
            err = float(diff.norm() / want[name].norm().clamp_min(1e-12))
            moved_t = float((want[name] - initial[name]).norm())
            within = (err <= (1e-3 if name in noise else 1e-4) or float(diff.abs().max()) <= 0.05 * cfg.train.lr
                      or float(diff.norm()) <= 0.05 * moved_t)
            assert within, (f"{side} {name}: relative difference {err:.3g}, largest {float(diff.abs().max()):.3g}, "
                            f"{float(diff.norm()):.3g} apart after moving {moved_t:.3g}")
    client = mlflow.tracking.MlflowClient(runs["colocated"].tracking_uri)
    terms = [k for k in client.get_run(runs["colocated"].mlflow_run_id).data.metrics if k.startswith(("G/", "D/"))]
    assert {"G/image_gan", "G/image_raw_gan", "G/flow_endpoint", "G/video0_gan", "D/video0"} <= set(terms)
    for key in terms:
        a, b = history(runs["colocated"], key), history(runs["split"], key)
        assert [s for s, _ in a] == [s for s, _ in b] and a, key  # D_V terms from step 3: 2 frames are too few
        for (_, x), (_, y) in zip(a, b, strict=True):
            assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-6), key
    # Metrics are in MLflow, found with search_runs, and the run has its params and a sample video.
    for result in runs.values():
        client = mlflow.tracking.MlflowClient(result.tracking_uri)  # no global tracking URI left behind
        found = client.search_runs([client.get_experiment_by_name("vid2vid").experiment_id],
                                   filter_string=f"tags.mlflow.runName = '{result.run_name}'")
        assert len(found) == 1 and "G/total" in found[0].data.metrics
        assert found[0].data.params["model.ngf"] == "16"
        artifacts = client.list_artifacts(result.mlflow_run_id, "samples")
        assert any(a.path.endswith(".mp4") for a in artifacts)


@pytest.mark.parametrize("preset", ["cityscapes_512", "cityscapes_1024", "cityscapes_2048", "face_512", "pose_512"])
def test_paper_scale_presets_checkpoint_often_and_survive_lost_nodes(preset):
    train_cfg = load_config([f"preset={preset}"]).train
    assert 0 < train_cfg.checkpoint_every <= 1000 and train_cfg.max_failures >= 3


def test_a_warm_started_run_at_lr_0_keeps_every_tensor_and_its_epoch_end_kill_logs_nothing_twice(
        shards, tmp_path):
    """A 2-scale run warm-started from a 1-scale model (G and D), 2 data-parallel workers with ZeRO-1,
    train.lr=0: after its steps every tensor is still what the warm start gave it: the source's for
    ``scales.0`` and every matching discriminator layer, the fresh initialisation for the new ones.
    The same run checkpoints only at epoch ends and is killed right after the first one: the metrics
    flushed there waited for that checkpoint's commit, so the resumed run logs no step twice."""
    source_cfg = smoke(tmp_path)
    torch.manual_seed(123)  # not the run's seed, so copied and fresh tensors differ
    source = {"generator": GeneratorSide(source_cfg.model), "discriminator": DiscriminatorSide(source_cfg.model)}
    for side, module in source.items():
        save_weights(tmp_path / "source", side, module)
    cfg = smoke(tmp_path, "model.n_scales_spatial=2", "model.num_D=2", "train.lr=0", "train.max_steps=0",
                "train.num_workers=2", "train.zero_stage=1", "train.checkpoint_every=0", "train.max_failures=3",
                f"train.warm_start={tmp_path / 'source'}")
    # killed after step 1, the end of epoch 0: one clip per worker
    result = train(cfg, shards, fault_hook=KillOnce((1,), str(tmp_path / "kills.json")))
    assert json.loads((tmp_path / "kills.json").read_text()) == [1]
    assert [s for s, _ in history(result, "step")] == [1, 2]
    fresh = dict(zip(("generator", "discriminator"), build_sides(cfg, "both", torch.device("cpu")), strict=True))
    for side in ("generator", "discriminator"):
        final = torch.load(Path(result.checkpoint) / side / "weights.pt", weights_only=True)
        src, new = source[side].state_dict(), fresh[side].state_dict()
        copied = [k for k in final if k in src and src[k].shape == final[k].shape]
        assert copied and len(copied) < len(final)
        for name, value in final.items():
            assert torch.equal(value, src[name] if name in copied else new[name]), f"{side} {name}"
        if side == "generator":
            assert {k for k in final if k.startswith("generator.scales.0.")} <= set(copied)


def test_resume_continues_the_step_counter_with_the_saved_weights(shards, tmp_path):
    first = train(smoke(tmp_path, "train.run_name=resumable", "train.max_steps=2"), shards)
    saved = torch.load(Path(first.checkpoint) / "generator" / "weights.pt", weights_only=True)
    saved_sum = float(sum(v.abs().sum() for k, v in saved.items() if v.is_floating_point() and "running" not in k))

    second = train(smoke(tmp_path, "train.run_name=resumable", "train.max_steps=4"), shards)
    assert second.mlflow_run_id == first.mlflow_run_id, "a resumed run keeps logging into its MLflow run"
    assert [s for s, _ in history(second, "step")] == [1, 2, 3, 4]
    restored = history(second, "restored/g_weight_abs_sum")
    assert [s for s, _ in restored] == [3]
    assert math.isclose(restored[0][1], saved_sum, rel_tol=1e-6)
