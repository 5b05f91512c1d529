"""Keep every port of a local, single-node Ray instance on the loopback address.

Ray has no public switch for this. It takes the node address from `get_node_ip_address()`, which is the
loopback address only where Ray clusters are disabled (its Windows/macOS default), and Ray Serve (2.60) binds
each replica's inter-deployment gRPC server to `[::]` whatever the node address. `cl-serve serve` is one node,
so nothing of Ray has to be reachable from another host: `use_loopback_ray()` (in the driver, before
`ray.init`) sets Ray's own switch for this process and the processes Ray starts, and marks them so that
`patch_replica_grpc()` (in each replica, from the deployment's constructor) moves the replica's gRPC server to
127.0.0.1. The test `test_every_ray_port_of_the_local_server_is_on_loopback` reads /proc to check the result.
"""
from __future__ import annotations

import logging
import os

LOOPBACK_ENV = "CL_SERVE_LOOPBACK_ONLY"
log = logging.getLogger("cl_serve")


def use_loopback_ray() -> None:
    """Before ray.init in a driver that starts a local Ray: every Ray port on 127.0.0.1."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ[LOOPBACK_ENV] = "1"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False  # already-imported Ray reads the module constant


def patch_replica_grpc() -> None:
    """In a replica of a loopback-only Ray: bind Serve's inter-deployment gRPC server to 127.0.0.1, not [::]."""
    if os.environ.get(LOOPBACK_ENV) != "1":
        return
    try:
        from ray.serve._private import replica
    except ImportError:
        return
    original = getattr(replica, "add_port_to_grpc_server", None)
    if original is None:
        log.warning("Ray Serve changed: the replica's gRPC server cannot be moved to 127.0.0.1")
        return
    if getattr(original, "cl_serve_loopback", False):
        return

    def add_port_on_loopback(server, address: str):
        if address.startswith("[::]:") or address.startswith("0.0.0.0:"):
            address = "127.0.0.1:" + address.rsplit(":", 1)[1]
        return original(server, address)

    add_port_on_loopback.cl_serve_loopback = True
    replica.add_port_to_grpc_server = add_port_on_loopback
