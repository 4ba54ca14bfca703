"""Running a test function in several spawned processes (torch.distributed tests on CPU)."""

from __future__ import annotations

import torch.multiprocessing as mp


def spawn_collect(target, world: int, args: tuple, timeout: float = 180.0) -> dict:
    """Run ``target(rank, *args, queue)`` in ``world`` spawned processes; return ``{rank: result}``.

    Fails fast when a worker dies, and never leaves a worker behind (a hung collective would
    otherwise block the test session).
    """
    import queue as queue_mod
    import time

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(r, *args, q)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world:
            try:
                rank, value = q.get(timeout=1.0)
                results[rank] = value
            except queue_mod.Empty:
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a worker exited with code {dead[0]}"
                assert time.monotonic() < deadline, f"workers gave {len(results)}/{world} results in {timeout} s"
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0, f"worker exit code {p.exitcode}"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return results
