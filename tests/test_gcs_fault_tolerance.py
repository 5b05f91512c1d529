"""GCS fault tolerance shown with real parts: Debian's redis-server as the GCS's external storage (what
components/gcs-fault-tolerance gives the RayService), a local two-node Ray cluster (`ray.cluster_utils.Cluster`, as
Ray's own GCS fault-tolerance tests build it: the head runs no replica, `num_cpus: 0`, like the RayService's), and
cl-serve's Serve application on it. While a client sends one-image `/classify` requests, the GCS server process is
killed and, seconds later, started again from Redis: every request is answered 200 throughout, and afterwards the
cluster still manages the application (a new version published to the store is served; Serve reports it RUNNING).

Runs in a fresh process (a Ray cluster of its own, started with RAY_REDIS_ADDRESS in its environment) and skips,
saying why, where no redis-server is installed (.ci/run installs Debian's). What it cannot show: KubeRay recreating a
head *pod* (here only the GCS process dies; the head's raylet and the proxy on it live on) and the operator's Redis
clean-up; those are checked against the operator's code in tests/test_deploy.py."""
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.serving]

SCRIPT = textwrap.dedent('''
    import json, os, socket, subprocess, sys, threading, time, uuid
    from pathlib import Path

    import httpx
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from cl_serve.base.loopback import use_loopback_ray
    from cl_serve.serving.app import build_app
    from cl_serve.serving.launch import free_port
    from cl_serve.trainer.synthetic import class_names, write_image_folder
    from cl_serve.trainer.train import TrainConfig
    from cl_serve.workflow import pipeline

    work = Path(sys.argv[1])
    store = work / "store"
    tiny = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    pipeline.init_store(store, method={"name": "none"}, head={"name": "analytic", "projection": 64},
                        backbone="vit_tiny_patch16_224", timm_kwargs=tiny)
    names = class_names(6)
    first = write_image_folder(work / "t0", names[:3], 8, seed=0)
    second = write_image_folder(work / "t1", names[3:], 8, seed=1)
    cfg = TrainConfig(epochs=1, batch_size=16, device="cpu")
    pipeline.add_task(store, first, cfg, progress=False)
    image = next(first.rglob("*.png")).read_bytes()

    redis_port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", redis_port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    os.environ["RAY_REDIS_ADDRESS"] = f"127.0.0.1:{redis_port}"  # what KubeRay sets from gcsFaultToleranceOptions
    os.environ["RAY_external_storage_namespace"] = str(uuid.uuid4())
    use_loopback_ray()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(str(store), poll_interval_s=0.2), name="cl-serve", route_prefix="/", blocking=False)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.post(url + "/classify", files=[("file", ("a.png", image, "image/png"))], timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)

    results, stop = [], threading.Event()
    def client():
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(5000):  # bounded; stopped by the event long before
                if stop.is_set():
                    return
                t0 = time.monotonic()
                try:
                    status = c.post("/classify", files=[("file", ("a.png", image, "image/png"))]).status_code
                except httpx.HTTPError as e:
                    status = type(e).__name__
                results.append((time.monotonic(), status, time.monotonic() - t0))
                time.sleep(0.02)
    thread = threading.Thread(target=client)
    thread.start()
    time.sleep(3)
    gcs = cluster.head_node.all_processes["gcs_server"][0].process
    killed_at = time.monotonic()
    cluster.head_node.kill_gcs_server()
    gcs.wait()
    time.sleep(5)  # the GCS is down: requests keep going through the proxy to the replicas
    restarted_at = time.monotonic()
    cluster.head_node.start_gcs_server()
    time.sleep(5)
    pipeline.add_task(store, second, cfg, progress=False)  # a new version while the cluster recovers
    version, deadline = None, time.time() + 60
    while time.time() < deadline and version != 2:
        version = httpx.post(url + "/classify", files=[("file", ("a.png", image, "image/png"))], timeout=30
                             ).json().get("model_version")
        time.sleep(0.3)
    stop.set()
    thread.join()
    status = serve.status().applications["cl-serve"].status
    during = [r for r in results if killed_at <= r[0] <= restarted_at]
    out = {"requests": len(results), "failed": [r for r in results if r[1] != 200],
           "requests_while_gcs_down": len(during), "max_latency_s": max(r[2] for r in results),
           "served_version_after": version, "app_status_after": str(status)}
    print("RESULT " + json.dumps(out), flush=True)
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    redis.terminate()
''')


def test_serving_continues_while_the_gcs_restarts_from_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server (apt-get install redis-server; .ci/run installs it)")
    script = tmp_path / "gcs_ft.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, timeout=420,
                          env=env)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, (proc.stdout[-3000:], proc.stderr[-3000:])
    result = json.loads(line.removeprefix("RESULT "))
    print(result)
    assert result["requests_while_gcs_down"] >= 5, result  # the client really ran through the outage
    assert result["failed"] == [], result
    assert result["served_version_after"] == 2, result  # hot swap still works after the restart
    assert result["app_status_after"].endswith("RUNNING"), result
