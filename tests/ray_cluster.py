"""A multi-node Ray cluster on this machine, every socket on loopback, for the Ray backend's tests.

    python tests/ray_cluster.py '{"num_cpus": 1, "resources": {"learner_node": 1}}' '{"num_cpus": 2, ...}'

The first JSON is the head node, each further one a worker node (Ray's own multi-node test cluster,
``ray.cluster_utils``: a GCS and one raylet per node, each with its own resources). It prints one
JSON line ``{"address": ..., "nodes": [...]}`` once every node is up, then keeps the cluster until
stdin closes or SIGTERM, and shuts it down.

Loopback: ``ray start --node-ip-address 127.0.0.1`` is rewritten by Ray to the machine's interface
address (and its servers then listen on every interface); Ray keeps a loopback node address only
where it treats the machine as single-host (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the macOS and
Windows default), which its ``ray start`` then refuses to join with worker nodes. The test cluster
adds its nodes in-process, so every node gets 127.0.0.1 and Ray binds its servers there.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # before ray is imported: the node IP stays 127.0.0.1
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
# Ray's files (sessions, sockets, the cluster address) in a directory of our own, not the shared
# /tmp/ray; short, because Ray's unix socket paths must fit in 107 bytes.
TEMP_DIR = tempfile.mkdtemp(prefix="ao1ray-", dir="/tmp")
os.environ["RAY_TMPDIR"] = TEMP_DIR

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

# Small and explicit on a shared 2-core box: Ray's defaults size the object store and CPU count
# from the whole machine, per node.
NODE_DEFAULTS = {"object_store_memory": 80 * 1024 * 1024, "num_gpus": 0}


def main() -> int:
    specs = [json.loads(a) for a in sys.argv[1:]]
    temp_dir = os.path.join(TEMP_DIR, "ray")
    head = {**NODE_DEFAULTS, "include_dashboard": False, "temp_dir": temp_dir, **specs[0]}
    cluster = Cluster(initialize_head=True, head_node_args=head)
    for spec in specs[1:]:
        cluster.add_node(**{**NODE_DEFAULTS, "temp_dir": temp_dir, **spec})
    cluster.wait_for_nodes()
    nodes = [{"node_id": n.node_id, "ip": n.node_ip_address} for n in [cluster.head_node, *cluster.worker_nodes]]
    print(json.dumps({"address": cluster.address, "temp_dir": temp_dir, "nodes": nodes}), flush=True)

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        sys.stdin.read()
    except KeyboardInterrupt:
        pass
    cluster.shutdown()
    ray.shutdown()
    shutil.rmtree(TEMP_DIR, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
