"""Where the generator and the discriminators live: a pure plan, then the process groups it needs.

A *rank* is one training process (one Ray Train worker). Two modes:

- ``colocated``: every rank holds G and D; both are data parallel over the whole world.
- ``split``: G ranks and D ranks are disjoint, the paper's 8 GPUs -> 4 (G) + 4 (D). G rank ``g`` is
  paired with exactly one D rank: it sends its fake frames there and receives the gradient of the
  adversarial and feature-matching losses back. Every pair is point to point, so no rank is a hub
  (the reference gathers everything on GPU 0).

Within a block of ranks (the whole world, or one node when ``node_size`` is given) the first half
holds G and the second half D, so partners sit on the same node and frames never cross the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MODES = ("colocated", "split")


@dataclass(frozen=True)
class Placement:
    mode: str  # "colocated" | "split"
    world_size: int
    generator_ranks: tuple[int, ...]
    discriminator_ranks: tuple[int, ...]
    gpus_per_worker: int = 0  # 0: CPU ranks

    def _check(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world of {self.world_size} ranks")

    def role(self, rank: int) -> str:
        """"both" (colocated), "generator" or "discriminator" (split)."""
        self._check(rank)
        if self.mode == "colocated":
            return "both"
        return "generator" if rank in self.generator_ranks else "discriminator"

    def partner(self, rank: int) -> int:
        """The rank holding the other half of the GAN for ``rank``'s samples (itself when colocated)."""
        role = self.role(rank)
        if role == "both":
            return rank
        mine, theirs = (
            (self.generator_ranks, self.discriminator_ranks)
            if role == "generator"
            else (self.discriminator_ranks, self.generator_ranks)
        )
        return theirs[mine.index(rank)]

    def group_ranks(self, rank: int) -> tuple[int, ...]:
        """Ranks of the data-parallel group ``rank`` belongs to (its gradients are averaged there)."""
        role = self.role(rank)
        if role == "discriminator":
            return self.discriminator_ranks
        return self.generator_ranks  # colocated: every rank, split G: the G ranks

    def device(self, rank: int, local_gpus: int) -> str:
        """Device of ``rank``: "cpu", or the first of the GPUs it owns among ``local_gpus`` visible ones.

        Under Ray Train each worker sees only its own GPUs (``local_gpus == gpus_per_worker``) and
        gets ``cuda:0``; when every GPU of a node is visible (torchrun) rank r takes GPU r mod local.
        """
        self._check(rank)
        if self.gpus_per_worker == 0 or local_gpus == 0:
            return "cpu"
        return f"cuda:{(rank * self.gpus_per_worker) % local_gpus}"


def plan_placement(num_workers: int, gpus_per_worker: int, mode: str,
                   node_size: int | None = None) -> Placement:
    """Plan ``num_workers`` ranks; ``gpus_per_worker`` 0 means CPU, 1 one GPU per rank.

    ``node_size`` (ranks per node, split mode only) halves each node separately so that every
    G/D pair is on one node; by default the world is one block (8 -> G 0-3, D 4-7).
    """
    if mode not in MODES:
        raise ValueError(f"placement mode {mode!r} is not one of {list(MODES)}")
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if gpus_per_worker not in (0, 1):
        raise ValueError(
            f"gpus_per_worker={gpus_per_worker}: a rank drives one device; run one worker per GPU "
            f"(num_workers={num_workers * max(gpus_per_worker, 1)}, gpus_per_worker=1) instead"
        )
    ranks = tuple(range(num_workers))
    if mode == "colocated":
        return Placement(mode, num_workers, ranks, ranks, gpus_per_worker)
    if num_workers < 2:
        raise ValueError("placement 'split' needs at least 2 workers (one G rank and one D rank); "
                         "use 'colocated' for a single worker")
    if num_workers % 2:
        raise ValueError(f"placement 'split' needs an even number of workers to pair every G rank with "
                         f"one D rank, got {num_workers}")
    block = num_workers if node_size is None else node_size
    if block < 2 or block % 2 or num_workers % block:
        raise ValueError(f"node_size={node_size}: must be even and divide num_workers={num_workers}")
    gen, dis = [], []
    for start in range(0, num_workers, block):
        half = block // 2
        gen += range(start, start + half)
        dis += range(start + half, start + block)
    return Placement(mode, num_workers, tuple(gen), tuple(dis), gpus_per_worker)


# ------------------------------------------------------------------------------------------------
# Process groups and the DeepSpeed ``mpu`` adaptor
# ------------------------------------------------------------------------------------------------


class GroupMPU:
    """The slice of Megatron's ``mpu`` interface DeepSpeed 0.19 reads, for data parallel in one group.

    DeepSpeed takes its data-parallel group (gradient all-reduce, ZeRO partitions, broadcast of the
    initial weights) from ``mpu.get_data_parallel_group()``. It also all-reduces gradient norms over
    ``mpu.get_model_parallel_group()``: that must be a group of this rank alone, since ``None`` would
    mean the whole world and mix G's and D's norms (or hang, as the other side never joins).
    """

    def __init__(self, dp_group: Any, dp_ranks: tuple[int, ...], mp_group: Any):
        self._dp_group, self._dp_ranks, self._mp_group = dp_group, tuple(dp_ranks), mp_group

    def get_data_parallel_group(self):
        return self._dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self._dp_ranks)

    def get_data_parallel_world_size(self) -> int:
        return len(self._dp_ranks)

    def get_data_parallel_rank(self) -> int:
        import torch.distributed as dist

        return self._dp_ranks.index(dist.get_rank())

    def get_model_parallel_group(self):
        return self._mp_group

    def get_model_parallel_world_size(self) -> int:
        return 1

    def get_model_parallel_rank(self) -> int:
        return 0


def make_groups(placement: Placement) -> dict[str, Any]:
    """Create the process groups of ``placement``; every rank must call this, in the same program order.

    ``torch.distributed.new_group`` is collective over the *world*: each rank has to create every
    group, even those it is not in, in the same order, or the ranks deadlock. Returns
    ``{"generator", "discriminator", "model_parallel", "mpu"}`` where ``mpu`` is the
    :class:`GroupMPU` for this rank's role (``None`` when colocated: DeepSpeed's default, the world,
    is already right and saves a group).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("make_groups: torch.distributed is not initialised (init_process_group first)")
    if dist.get_world_size() != placement.world_size:
        raise ValueError(f"make_groups: the process group has {dist.get_world_size()} ranks but the "
                         f"placement was planned for {placement.world_size}")
    rank = dist.get_rank()
    if placement.mode == "colocated":
        return {"generator": dist.group.WORLD, "discriminator": dist.group.WORLD,
                "model_parallel": None, "mpu": None}
    gen = dist.new_group(list(placement.generator_ranks))
    dis = dist.new_group(list(placement.discriminator_ranks))
    own = None
    for r in range(placement.world_size):  # one single-rank group per rank, created by all
        g = dist.new_group([r])
        if r == rank:
            own = g
    dp = gen if placement.role(rank) == "generator" else dis
    mpu = GroupMPU(dp, placement.group_ranks(rank), own)
    return {"generator": gen, "discriminator": dis, "model_parallel": own, "mpu": mpu}
