"""The GPU paths, run for real on a CUDA device: bf16 autocast steps through DeepSpeed engines over
NCCL, CPU/GPU agreement of the model and of the eval feature nets, checkpoints of CUDA engines, and the
Ray Train job itself (experiments/cityscapes.py on CUDA, then resumed).

Every test here is marked ``gpu`` and skipped without a CUDA device (CI never has one). Run this
file in a process of its own (``pytest tests/test_gpu.py``): DeepSpeed picks its accelerator once
per process, and the CPU engine tests pin it to ``cpu``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from test_engines import adam_state

from vid2vid.config import ModelConfig, TrainConfig
from vid2vid.datasets.shards import Clip
from vid2vid.models.adversarial import DiscriminatorSide
from vid2vid.models.objective import Objective
from vid2vid.models.vgg import VGG19
from vid2vid.models.vid2vid import GeneratorSide
from vid2vid.platform.checkpointer import read_checkpoint, write_checkpoint
from vid2vid.platform.engines import build_engine, forward_precision
from vid2vid.training.engine import PlainEngine
from vid2vid.training.step import colocated_step

pytestmark = pytest.mark.gpu

H, W, T = 64, 128, 4
CUDA = torch.device("cuda", 0)


def model_config(vgg_path: str | None = None) -> ModelConfig:
    return ModelConfig(ngf=16, n_downsample_G=2, n_blocks=2, ndf=16, n_layers_D=2, num_D=2,
                       n_scales_temporal=2, n_frames_D=2, label_nc=35, vgg_weights=vgg_path)


def make_clip(device: torch.device, seed: int = 0) -> Clip:
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 35, (1, T, H, W), generator=g)
    labels[:, :, 16:32, 16:48] = 26  # a car: the foreground branch has pixels
    instances = torch.zeros(1, T, H, W, dtype=torch.long)
    instances[:, :, 16:32, 16:48] = 1
    edges = torch.zeros(1, T, H, W)
    edges[:, :, 16, 16:48] = 1
    frames = torch.rand(1, T, 3, H, W, generator=g) * 2 - 1
    flow = torch.randn(1, T, 2, H, W, generator=g)
    flow[:, 0] = 0
    conf = torch.ones(1, T, 1, H, W)
    conf[:, 0] = 0
    return Clip(labels, edges, instances, frames, flow, conf).to(device)


@pytest.fixture(scope="module")
def vgg_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("vgg") / "vgg19_random.pth"
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in VGG19().features.state_dict().items()}, path)
    return str(path)


@pytest.fixture(scope="module")
def nccl_world1(tmp_path_factory):
    """World size 1 over NCCL, with DeepSpeed's accelerator (re)detected as CUDA."""
    from deepspeed.accelerator import real_accelerator

    os.environ.pop("DS_ACCELERATOR", None)
    real_accelerator.ds_accelerator = None  # forget a CPU accelerator picked earlier in this process
    old = {k: os.environ.get(k) for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    os.environ.update({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"})
    torch.cuda.set_device(CUDA)
    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1, device_id=CUDA)
    from deepspeed.accelerator import get_accelerator

    assert get_accelerator().device_name() == "cuda"
    yield
    from deepspeed.utils import groups

    groups._WORLD_GROUP, groups.mpu = None, None
    dist.destroy_process_group()
    for k, v in old.items():
        os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


@contextlib.contextmanager
def exact_fp32():
    """No TF32 inside: CPU/GPU comparisons need true fp32 matmuls and convolutions."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def sides(cfg: ModelConfig, device: torch.device):
    torch.manual_seed(0)
    g = GeneratorSide(cfg).to(device)
    torch.manual_seed(1)
    return g, DiscriminatorSide(cfg).to(device)


def flat(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten().float().cpu() for p in module.parameters()])


def test_bf16_autocast_step_through_deepspeed_engines_matches_fp32(nccl_world1, vgg_path):
    cfg = model_config(vgg_path)
    objective = Objective(cfg).to(CUDA)
    results, conv_dtypes = {}, {}
    for precision in ("fp32", "bf16"):
        train = TrainConfig(zero_stage=2, precision=precision, grad_clip=1.0)
        g, d = sides(cfg, CUDA)
        g0 = flat(g)
        first_conv = next(m for m in g.modules() if isinstance(m, torch.nn.Conv2d))
        first_conv.register_forward_hook(lambda m, i, o, p=precision: conv_dtypes.setdefault(p, o.dtype) and None)
        ge = build_engine(g, train, 2e-4, (0.5, 0.999))
        de = build_engine(d, train, 2e-4, (0.5, 0.999))
        ctx = forward_precision(train, CUDA)
        with exact_fp32():
            steps = [colocated_step(ge, de, objective, cfg, make_clip(CUDA, s), T, torch.Generator().manual_seed(s),
                                    precision=ctx) for s in range(3)]
        assert all(p.dtype == torch.float32 for p in g.parameters())  # master weights stay fp32
        assert not torch.equal(flat(g), g0)
        results[precision] = steps
        ge.destroy()
        de.destroy()
    fp32, bf16 = results["fp32"][0], results["bf16"][0]
    assert conv_dtypes == {"fp32": torch.float32, "bf16": torch.bfloat16}  # autocast really ran convs in bf16
    for name, value in fp32.generator.terms.items():
        got, want = bf16.generator.terms[name].item(), value.item()
        assert abs(got - want) <= 0.05 * abs(want) + 1e-3, f"G/{name}: bf16 {got} vs fp32 {want}"
    for name, value in fp32.discriminator.terms.items():
        got, want = bf16.discriminator.terms[name].item(), value.item()
        assert abs(got - want) <= 0.05 * abs(want) + 1e-3, f"D/{name}: bf16 {got} vs fp32 {want}"
    for r in results["bf16"]:
        assert all(torch.isfinite(v) for v in r.generator.terms.values())
        assert all(torch.isfinite(v) for v in r.discriminator.terms.values())


def test_model_step_on_cuda_matches_cpu_in_fp32(vgg_path):
    cfg = model_config(vgg_path)
    out = {}
    for device in (torch.device("cpu"), CUDA):
        g, d = sides(cfg, device)
        g0 = flat(g)
        # SGD with lr 1 makes the weight change the gradient itself (Adam's first step is about
        # lr * sign(grad), which turns float noise in near-zero gradients into whole steps).
        ge = PlainEngine(g, torch.optim.SGD(g.parameters(), lr=1.0))
        de = PlainEngine(d, torch.optim.SGD(d.parameters(), lr=1.0))
        with exact_fp32():
            r = colocated_step(ge, de, Objective(cfg).to(device), cfg, make_clip(device), T,
                               torch.Generator().manual_seed(0))
        out[device.type] = (r, g0 - flat(g))
    (rc, grad_cpu), (rg, grad_gpu) = out["cpu"], out["cuda"]
    torch.testing.assert_close(rg.sequence.frames.cpu(), rc.sequence.frames, atol=2e-4, rtol=1e-4)
    for name, value in rc.generator.terms.items():
        torch.testing.assert_close(rg.generator.terms[name].cpu(), value, atol=1e-4, rtol=1e-3, msg=name)
    assert grad_cpu.norm() > 0
    assert (grad_gpu - grad_cpu).norm() / grad_cpu.norm() < 1e-3  # the same gradient of G on both devices


def test_cuda_engines_checkpoint_round_trip(nccl_world1, tmp_path):
    cfg, train = model_config(), TrainConfig(zero_stage=1, precision="bf16")
    objective, ctx = Objective(cfg).to(CUDA), forward_precision(train, CUDA)

    def engines(seed_offset: int):
        g, d = sides(cfg, CUDA)
        if seed_offset:
            torch.nn.init.normal_(next(g.parameters()))  # different start: the load must overwrite it
        return build_engine(g, train, 2e-4, (0.5, 0.999)), build_engine(d, train, 2e-4, (0.5, 0.999))

    ge, de = engines(0)
    colocated_step(ge, de, objective, cfg, make_clip(CUDA, 0), T, torch.Generator().manual_seed(0), precision=ctx)
    write_checkpoint(tmp_path / "ck", {"generator": ge, "discriminator": de}, {"step": 1})
    ge2, de2 = engines(1)
    assert read_checkpoint(tmp_path / "ck", {"generator": ge2, "discriminator": de2}) == {"step": 1}
    assert torch.equal(flat(ge.module), flat(ge2.module)) and torch.equal(flat(de.module), flat(de2.module))
    for a, b in ((ge, ge2), (de, de2)):
        sa, sb = adam_state(a), adam_state(b)
        assert len(sa) == len(sb) > 0 and all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))
    # The next step's losses agree (its forward sees the same weights). Weights after it are not
    # compared: grid_sample's backward uses atomics, and Adam turns last-bit gradient noise on
    # near-zero gradients into whole steps of lr.
    steps = [colocated_step(g_, d_, objective, cfg, make_clip(CUDA, 1), T, torch.Generator().manual_seed(1),
                            precision=ctx) for g_, d_ in ((ge, de), (ge2, de2))]
    for name, value in steps[0].generator.terms.items():
        torch.testing.assert_close(steps[1].generator.terms[name], value, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("net", ["i3d", "resnext101"])
def test_eval_feature_nets_agree_on_cpu_and_cuda(tmp_path, net):
    from vid2vid.eval.feature_nets import load_feature_net, save_random_weights

    path = save_random_weights(net, tmp_path / f"{net}.pt")
    x = torch.rand(2, 3, 16, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad(), exact_fp32():
        cpu = load_feature_net(net, path).extract(x)
        gpu = load_feature_net(net, path, CUDA).extract(x.to(CUDA)).cpu()
    assert cpu.shape == gpu.shape and cpu.abs().sum() > 0
    torch.testing.assert_close(gpu, cpu, atol=1e-3, rtol=1e-3)


def test_ray_train_job_runs_and_resumes_on_cuda(tmp_path):
    """The product itself on a GPU: experiments/cityscapes.py (Ray Data ingest, DeepSpeed engines inside a
    Ray Train worker, bf16, MLflow, checkpoints through ray.train.report), then a resume of the same run.
    A subprocess of its own: DeepSpeed picks its accelerator once per process."""
    import subprocess
    import sys

    import mlflow

    repo = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    args = ["preset=smoke", "data.synthetic_sequences=2", "data.synthetic_frames=8", "data.clip_len=4",
            f"data.out={tmp_path / 'shards'}", f"train.run_dir={tmp_path / 'runs'}", "train.run_name=gpu-job",
            "train.use_gpu=true", "train.precision=bf16", "train.checkpoint_every=2", "train.n_frames_total=4",
            "train.max_frames_total=4"]
    for steps in (4, 6):
        proc = subprocess.run([sys.executable, "experiments/cityscapes.py", *args, f"train.max_steps={steps}"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
    run_id = next((tmp_path / "runs" / "ray").rglob("mlflow_run_id.txt")).read_text().strip()
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert sorted(m.step for m in client.get_metric_history(run_id, "step")) == [1, 2, 3, 4, 5, 6]
    memory = client.get_metric_history(run_id, "gpu_mem_gb")
    assert memory and all(m.value > 0 for m in memory), "the worker really ran on the GPU"
    restored = client.get_metric_history(run_id, "restored/g_weight_abs_sum")
    assert [m.step for m in restored] == [5], "the second run resumed from step 4's checkpoint"
