"""The server's own Prometheus metrics, through `ray.serve.metrics` (exported on Ray's metrics endpoint).

    cl_serve_requests_total{status, version}       POST /classify answers by HTTP status and answering version
    cl_serve_request_latency_ms{status}            latency histogram of POST /classify
    cl_serve_batch_images                          images per model call (cl_serve.serving.batcher)
    cl_serve_swaps_total                           hot swaps to a new version
    cl_serve_refused_versions_total                versions refused (verification or load failed)
    cl_serve_rejected_overload_total{reason}       requests turned away: queue full or timed out, or given up
                                                   because their client left (client_gone)
    cl_serve_live_version                          the version this replica serves

Ray prefixes every name with `ray_` on the endpoint (e.g. `ray_cl_serve_requests_total`) and adds its own tags
(deployment, replica, application).
"""
from __future__ import annotations

import os

LATENCY_BOUNDARIES_MS = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


class ServerMetrics:
    """One set per replica; every method is cheap and never raises."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Histogram
        from ray.util.metrics import Gauge as RayGauge

        self.requests = Counter("cl_serve_requests", description="POST /classify answers",
                                tag_keys=("status", "version"))
        self.latency = Histogram("cl_serve_request_latency_ms", description="POST /classify latency (ms)",
                                 boundaries=LATENCY_BOUNDARIES_MS, tag_keys=("status",))
        self.batch_images = Histogram("cl_serve_batch_images", description="images per model call",
                                      boundaries=BATCH_BOUNDARIES)
        self.swaps = Counter("cl_serve_swaps", description="hot swaps to a new version")
        self.refused = Counter("cl_serve_refused_versions", description="versions refused (verify/load failed)")
        self.rejected = Counter("cl_serve_rejected_overload", description="requests turned away by overload "
                                "protection", tag_keys=("reason",))
        # Ray's plain Gauge: Serve's wrapper adds a request `route` tag a watcher-thread value cannot have
        self.live_version = RayGauge("cl_serve_live_version", description="version this replica serves",
                                     tag_keys=("pid",))
        self.live_version.set_default_tags({"pid": str(os.getpid())})

    def request(self, status: int, version: int | None, seconds: float) -> None:
        self.requests.inc(tags={"status": str(status), "version": "none" if version is None else str(version)})
        self.latency.observe(seconds * 1000.0, tags={"status": str(status)})

    def event(self, kind: str, version: int) -> None:
        if kind == "swap":
            self.swaps.inc()
            self.live_version.set(version)
        elif kind == "tick":  # every watcher poll: Ray (OpenTelemetry) exports a gauge only if set since the
            self.live_version.set(version)  # last collection
        elif kind == "refused":
            self.refused.inc()
