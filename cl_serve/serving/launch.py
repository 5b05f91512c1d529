"""`cl-serve serve`: start a local Ray instance and the Serve application, block until Ctrl-C, stop cleanly.

The local Ray instance is private to this machine: no dashboard (no job-submission API), and every Ray port
(GCS, raylet, workers, Serve controller, replicas, agents) on 127.0.0.1 (see cl_serve.base.loopback); only the HTTP
proxy listens on `--host`.

`--direct-port PORT` turns on Ray Serve's direct ingress (`RAY_SERVE_ENABLE_DIRECT_INGRESS`): each replica also
answers HTTP itself, on PORT, PORT + 1, ... (one per replica on this machine), so a request skips the proxy and the
proxy-to-replica call; `--port` keeps working through the proxy. The same application answers on both.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import time
import urllib.request

from cl_serve.serving import settings as server_settings
from cl_serve.base.errors import UserError
from cl_serve.base.loopback import use_loopback_ray
from cl_serve.store.open_store import open_store


_OWN_RAY = False  # whether `start` started the Ray instance (then `stop` ends all of it)
_ENV_BEFORE: dict[str, str | None] = {}  # variables `start` set for direct ingress, with their earlier values


def direct_ingress_env(first_port: int, replicas: int) -> dict[str, str]:
    """Ray Serve's settings for direct ingress with the replicas' HTTP ports at first_port ... (one per replica,
    and the same count of gRPC ports right after them). Read by Serve's controller and replicas when they start.
    Serve's port ranges end before their MAX; a released port goes straight back to the pool (its quarantine
    exists for HAProxy, not used here), so a restarted replica answers on the same port."""
    if not 1 <= first_port <= 65535 - 2 * replicas:
        raise UserError(f"--direct-port {first_port}: needs {2 * replicas} free ports from it, below 65536")
    grpc = first_port + replicas
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first_port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(grpc),
            "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": str(grpc),
            "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": str(grpc + replicas),
            "RAY_SERVE_PORT_QUARANTINE_S": "0"}


def start(store: str, host: str = "127.0.0.1", port: int = 8000, num_cpus: int | None = None,
          metrics_port: int | None = None, num_gpus: int | None = None, quiet: bool = False,
          direct_port: int | None = None, direct_slots: int | None = None, **app_kwargs):
    """Start a private local Ray + Serve on host:port with the classifier application; returns when deployed.
    `metrics_port`: Ray's Prometheus endpoint (http://127.0.0.1:PORT/metrics) with the server's own metrics.
    `quiet`: only errors from Ray and Serve on this process's log (the demo's output is the demo's).
    `direct_port`: replicas also answer on direct_port, direct_port + 1, ... (see the module's docstring), one port
    for each of `direct_slots` ingress replicas (default: the classifier's replicas; more when other ingress apps are
    deployed on the same Serve, as a benchmark's constant-answer app)."""
    global _OWN_RAY
    import logging

    import ray
    from ray import serve

    from cl_serve.serving.app import build_app

    open_store(store).config()  # a missing or broken store is a clear error before Ray starts
    if direct_port is not None:
        if ray.is_initialized():
            raise UserError("--direct-port needs the Ray instance cl-serve starts itself; on a cluster set "
                            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 in the Ray pods' environment instead")
        slots = direct_slots or app_kwargs.get("replicas", 1)
        for key, value in direct_ingress_env(direct_port, slots).items():
            _ENV_BEFORE.setdefault(key, os.environ.get(key))
            os.environ[key] = value  # Ray's processes started below inherit them; `stop` restores the old values
    if quiet:
        for name in ("ray", "ray.serve"):
            logging.getLogger(name).setLevel(logging.ERROR)
    if not ray.is_initialized():
        use_loopback_ray()
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False,
                 logging_level="ERROR" if quiet else "WARNING", log_to_driver=False,
                 _metrics_export_port=metrics_port)
        _OWN_RAY = True
    serve.start(http_options={"host": host, "port": port})
    if quiet:  # Serve sets its own logger's level when it starts
        logging.getLogger("ray.serve").setLevel(logging.ERROR)
    serve.run(build_app(store, **app_kwargs), name="cl-serve", route_prefix="/", blocking=False)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (for local servers in tests, the demo and benchmarks)."""
    return free_ports(1, host)[0]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """`n` distinct free TCP ports: every socket stays bound until all are drawn (separate free_port() calls may
    hand out the same port twice once the first socket is closed)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def wait_until_healthy(url: str, timeout_s: float = 180.0) -> float:
    """Poll GET {url}/healthz until it answers 200; returns the seconds waited, raises TimeoutError after timeout_s."""
    t0 = time.monotonic()
    while True:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=5) as r:
                if r.status == 200:
                    return time.monotonic() - t0
        except OSError:
            pass
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{url}/healthz did not answer 200 within {timeout_s:.0f}s")
        time.sleep(0.2)


def stop() -> None:
    import ray
    from ray import serve

    global _OWN_RAY
    try:
        if not _OWN_RAY:  # someone else's Ray: remove our application; ours: ending Ray ends Serve with it
            serve.shutdown()  # (and serve.shutdown first makes Ray report its killed controller as a failure)
    finally:
        ray.shutdown()
        _OWN_RAY = False
        for key, value in _ENV_BEFORE.items():  # a later `start` in this process is not a direct one by accident
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _ENV_BEFORE.clear()


def serve_forever(a) -> None:
    if a.replicas < 1:
        raise UserError("--replicas must be >= 1")
    if a.gpus_per_replica < 0:
        raise UserError("--gpus-per-replica must be >= 0")
    settings = {"poll_interval_s": a.poll_interval, "max_request_bytes": int(a.max_request_mb * 1024 * 1024),
                "max_queued_requests": a.max_queued_requests, "request_timeout_s": a.request_timeout,
                "canary_percent": a.canary, "model_name": a.model_name}
    try:
        server_settings.batch_settings(a.max_batch_size, a.batch_wait_ms)  # before Ray starts, as every setting
        server_settings.session_settings(a.intra_op_threads, a.ort_spinning)
        server_settings.validated(settings)  # the flag's name is in the message
    except ValueError as e:
        raise UserError(str(e)) from None
    start(a.store, a.host, a.port, a.num_cpus, metrics_port=a.metrics_port, replicas=a.replicas,
          max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms, poll_interval_s=settings.pop("poll_interval_s"),
          max_request_bytes=settings.pop("max_request_bytes"), gpus_per_replica=a.gpus_per_replica, settings=settings,
          auth_token=a.auth_token or os.environ.get("CL_SERVE_AUTH_TOKEN") or None, precision=a.precision,
          direct_port=a.direct_port, intra_op_threads=a.intra_op_threads, ort_spinning=a.ort_spinning)
    auth = "bearer token required" if (a.auth_token or os.environ.get("CL_SERVE_AUTH_TOKEN")) else "no auth token"
    print(f"cl-serve: serving {a.store} on http://{a.host}:{a.port} (page /, POST /classify, GET /v1/versions, "
          f"/v1/model, /healthz, /openapi.json; Open Inference Protocol: /v2/models/{a.model_name}/infer; {auth}); "
          f"metrics on http://127.0.0.1:{a.metrics_port}/metrics; Ctrl-C stops", flush=True)
    if a.direct_port is not None:
        print(f"cl-serve: the same routes straight from the replica{'s' if a.replicas > 1 else ''} (no proxy hop) "
              f"on http://{a.host}:{a.direct_port}" + (f" to {a.direct_port + a.replicas - 1}" if a.replicas > 1 else ""),
              flush=True)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("cl-serve: stopping", file=sys.stderr)
    finally:
        stop()
