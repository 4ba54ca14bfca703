"""DeepSpeed engines for a GAN on CPU/gloo, checked step for step against plain PyTorch.

One process (world size 1) for the two-engine GAN, checkpoints and the optimizer rebuild; one
2-process spawn for data parallelism (colocated, and through the ``mpu`` adaptor) and for engines
under the split placement's groups. The split G/D hand-off itself runs in the Ray Train tests.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from spawn import spawn_collect
from torch import nn

from vid2vid.checkpoints import decode_rng, encode_rng, read_rank_state
from vid2vid.config import TrainConfig
from vid2vid.platform.checkpointer import read_checkpoint, write_checkpoint
from vid2vid.platform.engines import (
    UnsafeCheckpointError,
    build_engine,
    deepspeed_config,
    forward_precision,
    get_lr,
    load_weights_only,
    rebuild_optimizer,
    set_lr,
)
from vid2vid.training.engine import frozen
from vid2vid.training.schedule import plan_epoch

LR, BETAS = 1e-2, (0.5, 0.999)
DS_ENV = {"DS_ACCELERATOR": "cpu", "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1"}
# world1 (tests/conftest.py): this process as a torch.distributed world of one, for DeepSpeed engines


# ------------------------------------------------------------------------------------------------
# Toy GAN and its plain-PyTorch reference
# ------------------------------------------------------------------------------------------------


def make_gan(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    g = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, padding=1))
    d = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, padding=1))
    return g, d


def batches(seed: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 2, 8, 8, generator=gen), torch.randn(1, 3, 8, 8, generator=gen)) for _ in range(n)]


def d_loss(out: torch.Tensor) -> torch.Tensor:  # LSGAN, real first then fake
    return ((out[:1] - 1) ** 2).mean() + (out[1:] ** 2).mean()


def g_loss(out: torch.Tensor) -> torch.Tensor:
    return ((out - 1) ** 2).mean()


def reference_gan(g: nn.Module, d: nn.Module, data, clip: float) -> None:
    """The same alternating D-then-G steps in plain PyTorch (Adam + gradient-norm clipping)."""
    og, od = torch.optim.Adam(g.parameters(), LR, BETAS), torch.optim.Adam(d.parameters(), LR, BETAS)
    for x, real in data:
        fake = g(x)
        od.zero_grad()
        d_loss(d(torch.cat([real, fake.detach()]))).backward()
        nn.utils.clip_grad_norm_(d.parameters(), clip)
        od.step()
        og.zero_grad()
        g_loss(d(fake)).backward()
        nn.utils.clip_grad_norm_(g.parameters(), clip)
        og.step()


def engine_gan(ge, de, data) -> None:
    """The two rules in vid2vid/platform/engines.py's docstring: D through its engine once per backward;
    G's step with D frozen and bare."""
    for x, real in data:
        fake = ge(x)
        de.backward(d_loss(de(torch.cat([real, fake.detach()]))))
        de.step()
        with frozen(de.module):
            loss = g_loss(de.module(fake))
        ge.backward(loss)
        ge.step()


def flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in module.parameters()])


def adam_state(engine) -> list[torch.Tensor]:
    """Adam moments and step counts of an engine (ZeRO wraps a torch Adam over flat partitions)."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    out = []
    for s in inner.state_dict()["state"].values():
        out += [torch.as_tensor(s[k]).flatten().float() for k in ("step", "exp_avg", "exp_avg_sq")]
    return out


# ------------------------------------------------------------------------------------------------
# One process, world size 1
# ------------------------------------------------------------------------------------------------


def test_deepspeed_config_follows_train_config():
    cfg = TrainConfig(batch_size=2, zero_stage=2, grad_clip=0.5, precision="auto")
    c = deepspeed_config(cfg, 4, on_gpu=False)
    assert c["train_batch_size"] == 8 and c["train_micro_batch_size_per_gpu"] == 2
    assert c["zero_optimization"]["stage"] == 2 and c["gradient_clipping"] == 0.5
    assert c["steps_per_print"] >= 10**6
    # bf16 is torch autocast inside the engines (fp32 weights and all-reduce), on GPU only.
    gpu = deepspeed_config(cfg, 4, on_gpu=True)
    assert not c["bf16"]["enabled"] and not gpu["bf16"]["enabled"] and not c["torch_autocast"]["enabled"]
    assert gpu["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert not deepspeed_config(TrainConfig(precision="fp32"), 1, on_gpu=True)["torch_autocast"]["enabled"]
    with pytest.raises(ValueError, match="zero_stage"):
        deepspeed_config(TrainConfig(zero_stage=3), 1, on_gpu=False)
    with pytest.raises(ValueError, match="needs a GPU"):
        deepspeed_config(TrainConfig(precision="bf16"), 1, on_gpu=False)


def test_forward_precision_is_bf16_autocast_on_gpu_only():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert forward_precision(TrainConfig(precision="auto"), cpu) is contextlib.nullcontext
    assert forward_precision(TrainConfig(precision="fp32"), gpu) is contextlib.nullcontext
    for precision in ("auto", "bf16"):
        ctx = forward_precision(TrainConfig(precision=precision), gpu)
        assert ctx.func is torch.autocast and ctx.keywords == {"device_type": "cuda", "dtype": torch.bfloat16}
    with pytest.raises(ValueError, match="precision=bf16 needs a GPU.*runs on cpu"):
        forward_precision(TrainConfig(precision="bf16"), cpu)


@pytest.mark.parametrize("stage", [1, 2])
def test_two_engines_gan_matches_plain_pytorch(world1, stage):
    cfg = TrainConfig(zero_stage=stage, grad_clip=0.5)
    data = batches(0, 3)
    g_ref, d_ref = make_gan(0)
    reference_gan(g_ref, d_ref, data, clip=0.5)
    g, d = make_gan(0)
    g0, d0 = flat(g), flat(d)
    ge, de = build_engine(g, cfg, LR, BETAS), build_engine(d, cfg, LR, BETAS)
    engine_gan(ge, de, data)
    assert not torch.equal(flat(g), g0) and not torch.equal(flat(d), d0)
    torch.testing.assert_close(flat(d), flat(d_ref), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(flat(g), flat(g_ref), atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in d.parameters())  # frozen() restored the flags


class RayLikeCheckpoint:
    """What read_checkpoint needs of a ``ray.train.Checkpoint``: ``as_directory()``."""

    def __init__(self, path):
        self.path = path

    @contextlib.contextmanager
    def as_directory(self):
        yield str(self.path)


@pytest.mark.parametrize("stage", [0, 2])
def test_checkpoint_round_trip_into_fresh_engines(world1, tmp_path, stage):
    cfg = TrainConfig(zero_stage=stage)
    data = batches(1, 3)
    g, d = make_gan(0)
    ge, de = build_engine(g, cfg, LR, BETAS), build_engine(d, cfg, LR, BETAS)
    engine_gan(ge, de, data[:2])
    state = {"epoch": 1, "step": 2, "batch_in_epoch": 2}
    rng = torch.Generator().manual_seed(3)
    torch.randperm(10, generator=rng)  # a generator part-way through its stream
    write_checkpoint(tmp_path / "ck", {"generator": ge, "discriminator": de}, state,
                     rank_state={"rng": encode_rng(rng)})

    g2, d2 = make_gan(7)  # different initial weights, fresh optimizers
    ge2, de2 = build_engine(g2, cfg, LR, BETAS), build_engine(d2, cfg, LR, BETAS)
    assert not torch.equal(flat(g2), flat(g))
    got = read_checkpoint(RayLikeCheckpoint(tmp_path / "ck"), {"generator": ge2, "discriminator": de2})
    assert got == state
    for a, b in ((ge, ge2), (de, de2)):
        assert torch.equal(flat(a.module), flat(b.module))
        sa, sb = adam_state(a), adam_state(b)
        assert len(sa) == len(sb) > 0 and all(torch.equal(x, y) for x, y in zip(sa, sb, strict=True))
    # The next step is identical too: nothing of the optimizer state was lost.
    engine_gan(ge, de, data[2:])
    engine_gan(ge2, de2, data[2:])
    assert torch.equal(flat(g), flat(g2)) and torch.equal(flat(d), flat(d2))

    # This rank's phi_I/phi_V generator continues where it was saved.
    restored = decode_rng(read_rank_state(tmp_path / "ck", 0)["rng"], torch.Generator())
    assert torch.equal(torch.randperm(10, generator=restored), torch.randperm(10, generator=rng))
    with pytest.raises(FileNotFoundError, match=r"no ranks/1.json for rank 1 .*train.num_workers"):
        read_rank_state(tmp_path / "ck", 1)

    with pytest.raises(KeyError, match="flow_net"):
        read_checkpoint(tmp_path / "ck", {"flow_net": ge2})
    with pytest.raises(FileNotFoundError, match="not a vid2vid checkpoint"):
        read_checkpoint(tmp_path, {"generator": ge2})


class RunsCode:
    """Unpickling this calls ``exec``: what a tampered checkpoint on shared storage could hold."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


@pytest.mark.parametrize("victim", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_a_tampered_checkpoint_is_refused_and_runs_nothing(world1, tmp_path, victim):
    cfg = TrainConfig(zero_stage=2)
    ge, de = (build_engine(m, cfg, LR, BETAS) for m in make_gan(0))
    engine_gan(ge, de, batches(1, 1))
    write_checkpoint(tmp_path / "ck", {"generator": ge, "discriminator": de}, {"step": 1})
    path = tmp_path / "ck" / "generator" / "state" / victim
    marker = tmp_path / "ran"
    torch.save({**load_weights_only(path), "extra": RunsCode(marker)}, path)
    torch.load(path, weights_only=False)  # what DeepSpeed's own loader does: the code runs
    assert marker.read_text() == "ran"
    marker.unlink()

    fresh = {"generator": build_engine(make_gan(1)[0], cfg, LR, BETAS),
             "discriminator": build_engine(make_gan(1)[1], cfg, LR, BETAS)}
    refused = re.escape(str(path)) + r": refused to load \(Unsupported global: GLOBAL exec\)"
    with pytest.raises(UnsafeCheckpointError, match=refused):
        read_checkpoint(tmp_path / "ck", fresh)
    assert not marker.exists()


def test_set_lr_and_decay_reach_the_engine_optimizer(world1):
    g, _ = make_gan(0)
    ge = build_engine(g, TrainConfig(zero_stage=2), LR, BETAS)
    set_lr(ge, 3e-4)
    assert get_lr(ge) == 3e-4
    set_lr(ge, LR * plan_epoch(5, TrainConfig(niter=0, niter_decay=5)).lr_factor)  # factor 0: Adam makes no move
    assert get_lr(ge) == 0.0
    before = flat(g)
    x, _ = batches(2, 1)[0]
    ge.backward(ge(x).square().mean())
    ge.step()
    assert torch.equal(flat(g), before)


def test_rebuild_optimizer_trains_unfrozen_coarse_scale(world1):
    cfg = TrainConfig(zero_stage=2)
    torch.manual_seed(0)
    net = nn.ModuleDict({"coarse": nn.Conv2d(2, 3, 3, padding=1), "fine": nn.Conv2d(3, 3, 3, padding=1)})

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net["fine"](self.net["coarse"](x))

    toy = Toy()
    net["coarse"].requires_grad_(False)  # niter_fix_global: only the finest scale trains
    eng = build_engine(toy, cfg, LR, BETAS)
    x, _ = batches(3, 1)[0]

    def step(e):
        e.backward(e(x).square().mean())
        e.step()

    c0, f0 = flat(net["coarse"]), flat(net["fine"])
    step(eng)
    assert torch.equal(flat(net["coarse"]), c0) and not torch.equal(flat(net["fine"]), f0)

    net["coarse"].requires_grad_(True)
    set_lr(eng, 5e-3)
    before = flat(toy)
    eng = rebuild_optimizer(eng, cfg)
    assert torch.equal(flat(toy), before) and get_lr(eng) == 5e-3  # rebuilding moves no weight
    c1 = flat(net["coarse"])
    step(eng)
    step(eng)
    assert not torch.equal(flat(net["coarse"]), c1)  # the stale optimizer would leave it untouched


# ------------------------------------------------------------------------------------------------
# Two processes: data parallel (colocated and through GroupMPU) and the split hand-off
# ------------------------------------------------------------------------------------------------


def _dp_worker(rank: int, store: str, ckpt_dir: str, q) -> None:
    os.environ.update(DS_ENV | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                "LOCAL_WORLD_SIZE": "2"})
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    from vid2vid.platform.placement import GroupMPU, make_groups, plan_placement

    out = {}
    try:
        cfg = TrainConfig(zero_stage=2, grad_clip=0.5)
        # (a) colocated, DeepSpeed's default world group; (b) the same through the mpu adaptor.
        singles = [dist.new_group([r]) for r in range(2)]
        mpus = {"world": None, "mpu": GroupMPU(dist.new_group([0, 1]), (0, 1), singles[rank])}
        for name, mpu in mpus.items():
            g, d = make_gan(0)  # same initial weights on both ranks
            ge, de = build_engine(g, cfg, LR, BETAS, mpu), build_engine(d, cfg, LR, BETAS, mpu)
            engine_gan(ge, de, batches(10 + rank, 2))  # different data per rank
            out[name] = (flat(g).tolist(), flat(d).tolist(), ge.dp_world_size)
            ge.destroy()
            de.destroy()
        # (c) the split placement's groups: rank 0 holds G, rank 1 holds D, each data parallel over a
        # group of one. Each engine steps on its own loss (the G/D hand-off itself runs in the Ray Train
        # test, test_train.py::test_split_placement_trains_like_colocated). Stage 0 too: its gradient
        # clipping all-reduces norms over the mpu's model-parallel group.
        plan = plan_placement(2, 0, "split")
        groups = make_groups(plan)
        role = plan.role(rank)
        for stage in (0, 2):
            mine = make_gan(0)[0 if role == "generator" else 1]
            eng = build_engine(mine, TrainConfig(zero_stage=stage, grad_clip=0.5), LR, BETAS, groups["mpu"])
            for x, real in batches(20, 2):
                eng.backward(own_loss(eng, role, x, real))
                eng.step()
            out[f"split{stage}"] = (flat(mine).tolist(), eng.dp_world_size)
        # Each side writes only its own engine into one shared folder (as Ray merges the ranks'
        # checkpoint folders); a fresh engine on the same rank reads it back.
        write_checkpoint(ckpt_dir, {role: eng}, {"step": 2}, all_engines=["discriminator", "generator"])
        dist.barrier()
        fresh = make_gan(5)[0 if role == "generator" else 1]
        state = read_checkpoint(ckpt_dir, {role: build_engine(fresh, cfg, LR, BETAS, groups["mpu"])})
        out["restored"] = (state, torch.equal(flat(fresh), flat(mine)))
        q.put((rank, out))
    finally:
        dist.destroy_process_group()


def own_loss(engine, role: str, x: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """G: its generator loss through a fixed critic; D: the D loss on real and a fixed fake."""
    if role == "generator":
        return (engine(x) - 1).square().mean()
    return d_loss(engine(torch.cat([real, torch.zeros_like(real)])))


def test_two_processes_data_parallel_and_split(tmp_path):
    res = spawn_collect(_dp_worker, 2, (str(tmp_path / "store"), str(tmp_path / "ck")))

    # Reference for data parallel: one process, the loss averaged over both ranks' batches.
    g_ref, d_ref = make_gan(0)
    pairs = list(zip(batches(10, 2), batches(11, 2), strict=True))
    og, od = torch.optim.Adam(g_ref.parameters(), LR, BETAS), torch.optim.Adam(d_ref.parameters(), LR, BETAS)
    for (x0, r0), (x1, r1) in pairs:
        f0, f1 = g_ref(x0), g_ref(x1)
        od.zero_grad()
        ((d_loss(d_ref(torch.cat([r0, f0.detach()]))) + d_loss(d_ref(torch.cat([r1, f1.detach()])))) / 2).backward()
        nn.utils.clip_grad_norm_(d_ref.parameters(), 0.5)
        od.step()
        og.zero_grad()
        ((g_loss(d_ref(f0)) + g_loss(d_ref(f1))) / 2).backward()
        nn.utils.clip_grad_norm_(g_ref.parameters(), 0.5)
        og.step()
    for name in ("world", "mpu"):
        (g0, d0, ws0), (g1, d1, ws1) = res[0][name], res[1][name]
        assert ws0 == ws1 == 2
        assert g0 == g1 and d0 == d1, f"{name}: data-parallel replicas diverged"
        torch.testing.assert_close(torch.tensor(g0), flat(g_ref), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(d0), flat(d_ref), atol=1e-5, rtol=1e-4)

    # Each side under the split groups steps like plain PyTorch on its own loss.
    g_ref, d_ref = make_gan(0)
    og, od = torch.optim.Adam(g_ref.parameters(), LR, BETAS), torch.optim.Adam(d_ref.parameters(), LR, BETAS)
    for x, real in batches(20, 2):
        for net, opt, role in ((g_ref, og, "generator"), (d_ref, od, "discriminator")):
            opt.zero_grad()
            own_loss(net, role, x, real).backward()
            nn.utils.clip_grad_norm_(net.parameters(), 0.5)
            opt.step()
    assert res[0]["restored"] == res[1]["restored"] == ({"step": 2}, True)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "discriminator", "generator", "vid2vid-checkpoint.json"]
    for key in ("split0", "split2"):
        assert res[0][key][1] == res[1][key][1] == 1
        torch.testing.assert_close(torch.tensor(res[0][key][0]), flat(g_ref), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(res[1][key][0]), flat(d_ref), atol=1e-5, rtol=1e-4)
