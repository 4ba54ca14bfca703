"""A ``ray.cluster_utils.Cluster`` in a process of its own, driven over stdin/stdout (test_multinode.py).

A process of its own because Ray reads its client settings (token auth) once per process, and the
test session may already be the driver of the suite's shared Ray.

    python tests/cluster_helper.py SPEC_JSON   # {"head": {...node args}, "workers": {"worker-1": {...}, ...}}
        prints one JSON line: {"address": GCS address, "raylets": {pid: node name}}
    stdin "remove NAME"  -> the node's processes are killed; prints "removed NAME"
    stdin "shutdown" or end of input -> every node is shut down, then the process exits
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    from ray._common.utils import reset_ray_address
    from ray._private import ray_constants
    from ray._private.utils import write_ray_address
    from ray.cluster_utils import Cluster

    spec = json.loads(sys.argv[1])
    cluster = Cluster(initialize_head=True, head_node_args=spec["head"])
    # Cluster writes its address where a plain ray.init() on this machine would join it: take it back.
    # A job's driver finds its cluster through the address file in the node's temp dir (Ray's job
    # supervisor resolves "auto" there; without it, it picks any Ray running on the machine).
    reset_ray_address()
    write_ray_address(cluster.address, spec["head"]["temp_dir"])
    nodes = {"head": cluster.head_node}
    try:
        for name, args in spec["workers"].items():
            nodes[name] = cluster.add_node(**args)
            write_ray_address(cluster.address, args["temp_dir"])
        cluster.wait_for_nodes()
        raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: name for name, n in nodes.items()}
        print(json.dumps({"address": cluster.address, "raylets": raylets}), flush=True)
        for line in sys.stdin:
            cmd, _, arg = line.strip().partition(" ")
            if cmd == "remove":
                cluster.remove_node(nodes.pop(arg))
                print(f"removed {arg}", flush=True)
            elif cmd == "shutdown":
                break
    finally:
        cluster.shutdown()
        reset_ray_address()
        for args in [spec["head"], *spec["workers"].values()]:
            reset_ray_address(args["temp_dir"])


if __name__ == "__main__":
    main()
