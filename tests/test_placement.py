"""Placement plans (pure) and the process groups they create (4 gloo processes, no DeepSpeed)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from spawn import spawn_collect

from vid2vid.platform.placement import GroupMPU, make_groups, plan_placement


def test_colocated_every_rank_holds_both():
    p = plan_placement(3, 0, "colocated")
    assert p.generator_ranks == p.discriminator_ranks == (0, 1, 2)
    assert [p.role(r) for r in range(3)] == ["both"] * 3
    assert [p.partner(r) for r in range(3)] == [0, 1, 2]
    assert p.group_ranks(1) == (0, 1, 2)
    assert p.device(2, local_gpus=0) == "cpu"


def test_split_eight_gpus_is_four_plus_four_paired_one_to_one():
    p = plan_placement(8, 1, "split")
    assert p.generator_ranks == (0, 1, 2, 3) and p.discriminator_ranks == (4, 5, 6, 7)
    assert not set(p.generator_ranks) & set(p.discriminator_ranks)
    assert [p.role(r) for r in (0, 3, 4, 7)] == ["generator", "generator", "discriminator", "discriminator"]
    partners = [p.partner(r) for r in range(8)]
    assert partners == [4, 5, 6, 7, 0, 1, 2, 3]
    # A bijection: partner(partner(r)) == r, and no rank is the partner of two ranks (no hub).
    assert all(p.partner(p.partner(r)) == r for r in range(8))
    assert len(set(partners)) == 8
    assert p.group_ranks(2) == (0, 1, 2, 3) and p.group_ranks(6) == (4, 5, 6, 7)


def test_split_per_node_keeps_pairs_on_one_node():
    p = plan_placement(16, 1, "split", node_size=8)
    assert p.generator_ranks == (0, 1, 2, 3, 8, 9, 10, 11)
    assert all(r // 8 == p.partner(r) // 8 for r in range(16))


def test_devices():
    p = plan_placement(8, 1, "split")
    assert p.device(5, local_gpus=1) == "cuda:0"  # Ray Train: each worker sees its own GPU only
    assert p.device(5, local_gpus=8) == "cuda:5"  # every GPU of the node visible (torchrun)
    assert p.device(5, local_gpus=0) == "cpu"
    assert plan_placement(2, 0, "split").device(1, local_gpus=8) == "cpu"


@pytest.mark.parametrize("args, msg", [
    ((3, 1, "split"), "even number"),
    ((1, 0, "split"), "at least 2 workers"),
    ((4, 1, "pipeline"), "not one of"),
    ((0, 1, "colocated"), "num_workers"),
    ((4, 2, "split"), "one worker per GPU"),
])
def test_bad_plans_are_clear_errors(args, msg):
    with pytest.raises(ValueError, match=msg):
        plan_placement(*args)
    with pytest.raises(ValueError, match="node_size"):
        plan_placement(8, 1, "split", node_size=3)


def test_rank_outside_the_world():
    with pytest.raises(ValueError, match="rank 4 is outside"):
        plan_placement(4, 0, "split").role(4)


def _groups_worker(rank: int, world: int, store_dir: str, q) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_dir}/store", rank=rank, world_size=world)
    try:
        plan = plan_placement(world, 0, "split")
        groups = make_groups(plan)
        mpu: GroupMPU = groups["mpu"]
        # Sum of global ranks over my data-parallel group only: G {0,1} -> 1, D {2,3} -> 5.
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=mpu.get_data_parallel_group())
        # Model-parallel group is this rank alone: an all-reduce leaves the value unchanged.
        m = torch.tensor([float(rank + 10)])
        dist.all_reduce(m, group=mpu.get_model_parallel_group())
        # Point-to-point with the partner: G sends, D answers with value * 2.
        buf = torch.zeros(1)
        if plan.role(rank) == "generator":
            dist.send(torch.tensor([float(rank + 1)]), plan.partner(rank))
            dist.recv(buf, plan.partner(rank))
        else:
            dist.recv(buf, plan.partner(rank))
            dist.send(buf * 2, plan.partner(rank))
        q.put((rank, (t.item(), m.item(), buf.item(), mpu.get_data_parallel_rank(),
                      mpu.get_data_parallel_world_size(), mpu.get_data_parallel_group_ranks())))
    finally:
        dist.destroy_process_group()


def test_make_groups_split_four_processes(tmp_path):
    res = spawn_collect(_groups_worker, 4, (4, str(tmp_path)))
    assert [res[r][0] for r in range(4)] == [1.0, 1.0, 5.0, 5.0]
    assert [res[r][1] for r in range(4)] == [10.0, 11.0, 12.0, 13.0]
    assert [res[r][2] for r in range(4)] == [2.0, 4.0, 1.0, 2.0]  # G r sent r+1 to D r+2, got 2(r+1) back
    assert [res[r][3] for r in range(4)] == [0, 1, 0, 1]
    assert all(res[r][4] == 2 for r in range(4))
    assert res[3][5] == [2, 3]


def test_make_groups_colocated_uses_the_world(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        g = make_groups(plan_placement(1, 0, "colocated"))
        assert g["mpu"] is None and g["generator"] is dist.group.WORLD
        with pytest.raises(ValueError, match="planned for 2"):
            make_groups(plan_placement(2, 0, "colocated"))
    finally:
        dist.destroy_process_group()
