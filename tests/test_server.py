"""The served product: real Ray Serve, real ONNX Runtime, a real HTTP client on 127.0.0.1.

One server for the module, started on an empty store with a bearer token: 503 first, then versions are published
while it runs. Hostile requests (malformed bodies, image bombs, schema-driven fuzzing) must get a 4xx in bounded
time, never a 5xx, and the replica keeps serving.
"""
import base64
import io
import threading
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from cl_serve.workflow import pipeline
from cl_serve.store.model_store import Store, vname
from cl_serve.contract.preprocessing import preprocess_image
from benchmarks.hostile import hostile_cases
from cl_serve.contract.store_schema import VERSION_STATES
from tests.conftest import StalledUploads, fast_train, init_tiny_store, metric_total, scrape_metrics

pytestmark = pytest.mark.serving
TOKEN = "s3cret-token"
MAX_QUEUED = 8  # per replica; the swap test's 4 sequential clients stay under it
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP_KWARGS = {"poll_interval_s": 0.2, "max_batch_size": 16, "max_request_bytes": 2_000_000, "auth_token": TOKEN}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cl_serve.serving import launch as serve_cli

    import os

    store = init_tiny_store(tmp_path_factory.mktemp("served") / "store", "sdlora")
    port, metrics_port = serve_cli.free_port(), serve_cli.free_port()
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # Ray's processes inherit it: metrics within a second
    serve_cli.start(str(store), port=port, num_cpus=2, metrics_port=metrics_port, **APP_KWARGS,
                    settings={"max_queued_requests": MAX_QUEUED})
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60, headers=AUTH) as client:
        yield {"store": store, "client": client, "url": url, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
    serve_cli.stop()


def _png(path) -> bytes:
    return open(path, "rb").read()


def _ensure_live(server, tasks) -> int:
    """The live version (publishing one when a test runs alone)."""
    s = Store(server["store"])
    if s.current() is None:
        pipeline.add_task(server["store"], tasks[0]["train"], fast_train(), progress=False)
    _wait_version(server["client"], s.current())
    return s.current()


def _wait_version(client, v, timeout=60.0) -> float:
    t0 = time.time()
    while time.time() - t0 < timeout:
        r = client.get("/healthz")
        if r.json().get("version") == v:
            return time.time() - t0
        time.sleep(0.05)
    raise AssertionError(f"server never swapped to version {v}: {client.get('/healthz').json()}")


def test_503_before_the_first_version(server):
    c = server["client"]
    r = c.post("/classify", json={"images": ["aGVsbG8="]})
    assert r.status_code == 503 and "no model version is live yet" in r.json()["error"]
    assert c.get("/healthz").status_code == 503


def test_classify_matches_the_torch_merged_model(server, tasks):
    store, c = server["store"], server["client"]
    pipeline.add_task(store, tasks[0]["train"], fast_train(), progress=False)
    pipeline.add_task(store, tasks[1]["train"], fast_train(), progress=False)
    _wait_version(c, 2)
    files = sorted(p for d in (tasks[0]["test"], tasks[1]["test"]) for p in d.rglob("*.png"))[::3]
    r = c.post("/classify", files=[("file", (p.name, _png(p), "image/png")) for p in files], data={"top_k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_version"] == 2 and len(body["predictions"]) == len(files)
    s = Store(store)
    m = s.manifest(2)
    model = pipeline.load_merged_model(s, 2)
    x = torch.from_numpy(np.stack([preprocess_image(Image.open(p), m.preprocessing) for p in files]))
    with torch.no_grad():
        expected = model(x).argmax(1).tolist()
    assert [p["class_id"] for p in body["predictions"]] == expected
    assert all(p["label"] == m.labels[p["class_id"]] and len(p["top_k"]) == 3 for p in body["predictions"])
    # JSON + base64 gives the same answer
    r2 = c.post("/classify", json={"images": [base64.b64encode(_png(p)).decode() for p in files[:4]]})
    assert [p["class_id"] for p in r2.json()["predictions"]] == expected[:4]
    info = c.get("/v1/model").json()
    assert info["version"] == 2 and info["labels"] == m.labels and len(info["tasks"]) == 2


def test_bad_inputs_get_4xx_json_and_the_replica_keeps_serving(server, tasks):
    _ensure_live(server, tasks)  # does not rely on an earlier test having published a version
    c = server["client"]
    good = _png(next(tasks[0]["test"].rglob("*.png")))
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buf, format="PNG")
    cases = {
        "not an image": (dict(files=[("file", ("a.png", b"hello", "image/png"))]), 415),
        "truncated": (dict(files=[("file", ("t.png", good[: len(good) // 2], "image/png"))]), 400),
        "empty body": (dict(content=b"", headers={"content-type": "application/json"}), 400),
        "unsupported type": (dict(content=b"abc", headers={"content-type": "text/plain"}), 415),
        "bad base64": (dict(json={"images": ["%%%"]}), 400),
        "bad json": (dict(content=b"{", headers={"content-type": "application/json"}), 400),
        "no file field": (dict(files=[("other", ("a.png", good, "image/png"))]), 400),
        "too large request": (dict(content=b"x" * 2_100_000, headers={"content-type": "application/json"}), 413),
        "bad top_k": (dict(json={"images": [base64.b64encode(good).decode()], "top_k": "many"}), 422),
    }
    for name, (kwargs, status) in cases.items():
        r = c.post("/classify", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert "error" in r.json(), name
    r = c.post("/classify", json={"images": [base64.b64encode(good).decode()]})
    assert r.status_code == 200


def test_hot_swap_and_prune_under_load_have_zero_failed_requests(server, tasks):
    store, c = server["store"], server["client"]
    s = Store(store)
    start_version = s.current()
    image = base64.b64encode(_png(next(tasks[0]["test"].rglob("*.png")))).decode()
    results, stop = [], threading.Event()

    def client_loop(n):
        with httpx.Client(base_url=str(c.base_url), timeout=60, headers=AUTH) as cl:
            seen, deadline = [], time.time() + 240
            for _ in range(n):
                if stop.is_set() or time.time() > deadline:
                    break
                t = time.time()
                try:
                    r = cl.post("/classify", json={"images": [image]})
                    seen.append((t, r.status_code, r.json().get("model_version")))
                except httpx.HTTPError as e:
                    seen.append((t, repr(e), None))
            results.append(seen)

    threads = [threading.Thread(target=client_loop, args=(5000,)) for _ in range(4)]
    for t in threads:
        t.start()
    published = []
    for t in (2, 3):  # two real add-tasks ...
        v = pipeline.add_task(store, tasks[t]["train"], fast_train(epochs=1), progress=False).version
        published.append((time.time(), v))
        _wait_version(c, v)
    pipeline.rollback(store, start_version)  # ... and a rollback + roll-forward: four swaps in all
    _wait_version(c, start_version)
    t_pub = time.time()
    pipeline.rollback(store, published[-1][1])
    delay = _wait_version(c, published[-1][1])
    time.sleep(1.0)
    from cl_serve.workflow import retention

    pruned = retention.prune(store, keep=2, apply=True)  # the store pruned under the server, clients still running
    assert pruned["removed"] and published[-1][1] in s.versions() and not set(pruned["removed"]) & set(s.versions())
    time.sleep(1.0)
    stop.set()
    for t in threads:
        t.join()
    flat = [r for seen in results for r in seen]
    failed = [r for r in flat if r[1] != 200]
    print(f"\nswap test: {len(flat)} requests, {len(failed)} failed, last swap delay {delay:.2f}s")
    assert len(flat) > 50 and not failed, failed[:5]
    newest = published[-1][1]
    after = [v for seen in results for (t, _, v) in seen if t > t_pub + delay + 0.3]
    assert after and all(v == newest for v in after)
    for seen in results:  # per client, versions only move with the store (monotonic between rollbacks)
        versions = [v for t, _, v in seen if t < published[-1][0]]
        assert versions == sorted(versions)


def test_a_corrupt_version_is_refused_and_the_old_one_keeps_answering(server, tasks):
    store, c = server["store"], server["client"]
    s = Store(store)
    live = s.current()
    bad = max(s.versions()) + 1
    import shutil

    shutil.copytree(s.version_dir(live), s.version_dir(bad))
    with open(s.version_dir(bad) / "model.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00garbage\x00")
    (store / "CURRENT").write_text(vname(bad) + "\n")  # bypasses set_current's check, as a broken writer would
    deadline = time.time() + 30
    while time.time() < deadline and str(bad) not in c.get("/healthz").json()["refused_versions"]:
        time.sleep(0.1)
    h = c.get("/healthz").json()
    assert h["version"] == live and "sha256" in h["refused_versions"][str(bad)] and h["last_error"]
    image = base64.b64encode(_png(next(tasks[0]["test"].rglob("*.png")))).decode()
    r = c.post("/classify", json={"images": [image]})
    assert r.status_code == 200 and r.json()["model_version"] == live
    s.set_current(live)


def _raw_post(url: str, extra_headers: bytes, body: bytes) -> int:
    """POST /classify over a bare socket (headers an HTTP client library would refuse to send); the status code."""
    import socket

    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + b"Authorization: Bearer " + TOKEN.encode() + b"\r\n" + extra_headers + b"\r\n" + body)
        head = sock.recv(65536)
    return int(head.split(b" ", 2)[1])


def test_a_sample_of_the_generated_hostile_corpus_gets_what_each_case_allows(server, tasks):
    """80 seeded cases of benchmarks.hostile_corpus (every family: formats, truncated and corrupted files, lying
    headers, JSON, multipart, framing): each gets a status its case allows (never a 5xx), in bounded time."""
    from benchmarks.hostile_corpus import sample

    c = server["client"]
    _ensure_live(server, tasks)
    good = _png(next(tasks[0]["test"].rglob("*.png")))
    wrong, slowest = [], (0.0, "")
    for case in sample(good, 80, seed=1):
        kwargs = dict(case.kwargs)
        t0 = time.monotonic()
        r = c.request(kwargs.pop("method", "POST"), "/classify", **kwargs)
        slowest = max(slowest, (time.monotonic() - t0, case.name))
        if r.status_code not in case.allowed:
            wrong.append((case.family, case.name, r.status_code, r.text[:120]))
    print(f"\ncorpus sample: slowest {slowest[1]!r} {slowest[0]:.2f}s")
    assert not wrong, wrong
    assert slowest[0] < 10.0, slowest  # a generous bound on a shared machine; the benchmark measures the real one
    assert c.post("/classify", files={"file": ("x.png", good, "image/png")}).status_code == 200


def test_hostile_requests_get_a_4xx_in_bounded_time_and_the_replica_keeps_serving(server, tasks):
    c = server["client"]
    _ensure_live(server, tasks)
    good = _png(next(tasks[0]["test"].rglob("*.png")))
    worst = (0.0, "")
    for name, kwargs in hostile_cases(good).items():
        t0 = time.monotonic()
        try:
            r = c.post("/classify", **kwargs)
        except httpx.RemoteProtocolError:  # the server may close a connection whose body it refused mid-stream
            continue
        took = time.monotonic() - t0
        worst = max(worst, (took, name))
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        body = r.json()
        assert set(body) >= {"error", "status"} and body["status"] == r.status_code, (name, body)
        assert took < 10.0, (name, took)
    for name, head in {"Content-Length over the limit": b"Content-Length: 99999999999\r\n",
                       "Content-Length not a number": b"Content-Length: 12abc\r\n",
                       "two Content-Lengths": b"Content-Length: 2\r\nContent-Length: 5000000\r\n"}.items():
        t0 = time.monotonic()
        status = _raw_post(server["url"], head, b"{}")
        worst = max(worst, (time.monotonic() - t0, name))
        assert 400 <= status < 500, (name, status)
    print(f"\nhostile requests: slowest {worst[1]!r} {worst[0]:.2f}s")
    r = c.post("/classify", json={"images": [base64.b64encode(good).decode()]})
    assert r.status_code == 200


def test_every_error_has_one_shape_and_the_token_guards_every_route_but_healthz(server):
    c, url = server["client"], server["url"]
    for method, path, status in [("GET", "/nope", 404), ("GET", "/classify", 405), ("DELETE", "/healthz", 405)]:
        r = c.request(method, path)
        assert r.status_code == status and r.json()["status"] == status and r.json()["error"], (path, r.text)
    with httpx.Client(base_url=url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        for method, path in [("POST", "/classify"), ("GET", "/v1/model"), ("GET", "/openapi.json"), ("GET", "/nope")]:
            r = anonymous.request(method, path)
            assert r.status_code == 401 and r.json()["status"] == 401 and "Bearer" in r.headers["www-authenticate"]
        r = anonymous.get("/v1/model", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401


def test_schema_driven_fuzzing_finds_no_5xx(server, tasks):
    """schemathesis generates requests from /openapi.json (bounded, derandomized: the same cases every run)."""
    _ensure_live(server, tasks)
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_dict(server["client"].get("/openapi.json").json())
    bodies = schema["/classify"]["POST"].body
    assert {b.media_type for b in bodies} == {"application/json", "multipart/form-data"}
    calls, slowest = [], 0.0
    for result in schema.get_all_operations():
        op = result.ok()

        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def probe(case):
            nonlocal slowest
            t0 = time.monotonic()
            r = case.call(base_url=server["url"], headers=AUTH, timeout=30)
            slowest = max(slowest, time.monotonic() - t0)
            calls.append(r.status_code)
            assert r.status_code < 500, (case.path, case.method, r.status_code, r.text[:300])
            assert slowest < 10.0

        probe()
    print(f"\nschemathesis: {len(calls)} requests, statuses {sorted(set(calls))}, slowest {slowest:.2f}s")
    assert len(calls) >= 40


def _listening_sockets() -> dict[int, list[str]]:
    """{pid: ["addr:port", ...]} of every TCP socket in LISTEN state, from /proc (no ss/psutil needed)."""
    import os

    inode_addr = {}
    for table, v6 in (("/proc/net/tcp", False), ("/proc/net/tcp6", True)):
        for line in open(table).read().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A":
                continue
            host, port = parts[1].split(":")
            raw = bytes.fromhex(host)
            if v6:
                words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
                addr = "127.0.0.1" if words[:12] == b"\0" * 10 + b"\xff\xff" and words[12:] == b"\x7f\0\0\x01" \
                    else ("::1" if words == b"\0" * 15 + b"\x01" else words.hex())
            else:
                addr = ".".join(str(b) for b in raw[::-1])
            inode_addr[parts[9]] = f"{addr}:{int(port, 16)}"
    out: dict[int, list[str]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inode_addr:
                    out.setdefault(int(pid), []).append(inode_addr[link[8:-1]])
        except OSError:
            continue
    return out


def test_every_ray_port_of_the_local_server_is_on_loopback(server):
    import ray

    session_pids = set()
    for pid, addrs in _listening_sockets().items():
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "ray" in cmd or pid == __import__("os").getpid():
            session_pids.add(pid)
            exposed = [a for a in addrs if not (a.startswith("127.0.0.1:") or a.startswith("::1:"))]
            assert not exposed, (cmd[:120], exposed)
    assert len(session_pids) >= 3  # GCS, raylet, replicas, ... were looked at
    assert ray.is_initialized()


def test_broken_current_keeps_the_old_version_serving_and_healthz_says_why(server, tasks):
    store, c = server["store"], server["client"]
    s = Store(store)
    live = _ensure_live(server, tasks)
    try:
        for garbage in (b"\xff\xfe\x00", "\u00b2".encode(), b"../../etc\n"):
            (store / "CURRENT").write_bytes(garbage)
            deadline = time.time() + 30
            while time.time() < deadline and not c.get("/healthz").json()["store_error"]:
                time.sleep(0.1)
            r = c.get("/healthz")
            assert r.status_code == 200, r.text  # still serving the version it has ...
            h = r.json()
            assert h["version"] == live and "broken store" in h["store_error"] and "rollback" in h["store_error"]
    finally:
        s.set_current(live)


def test_versions_over_http_and_classify_with_an_explicit_version(server, tasks):
    c, store = server["client"], server["store"]
    live = _ensure_live(server, tasks)
    s = Store(store)
    if len(s.versions()) < 2:
        pipeline.add_task(store, tasks[1]["train"], fast_train(), progress=False)
        live = _ensure_live(server, tasks)
    body = c.get("/v1/versions").json()
    states = {v["version"]: v["state"] for v in body["versions"]}
    assert body["live"] == live and states[live] == "live" and set(states) == set(s.versions())
    assert set(states.values()) <= set(VERSION_STATES)  # the vocabulary `cl-serve status` uses too
    row = next(v for v in body["versions"] if v["version"] == live)
    assert row["classes"] == len(s.manifest(live).labels) and row["parent"] == s.manifest(live).parent
    numbers = [v["version"] for v in body["versions"]]
    assert numbers == sorted(numbers, reverse=True) and body["total"] == len(numbers)  # newest first
    first_page = c.get("/v1/versions?limit=1").json()  # one page at a time, continued by next_before
    assert [v["version"] for v in first_page["versions"]] == numbers[:1] and first_page["next_before"] == numbers[0]
    rest = c.get(f"/v1/versions?limit=200&before={first_page['next_before']}").json()
    assert [v["version"] for v in rest["versions"]] == numbers[1:] and rest["next_before"] is None
    for bad in ("limit=0", "limit=201", "limit=1e3", "before=-1"):
        assert c.get(f"/v1/versions?{bad}").status_code == 422, bad
    info = c.get("/v1/model?labels_limit=2&labels_offset=1").json()
    labels = s.manifest(live).labels
    assert info["labels"] == labels[1:3] and info["num_classes"] == len(labels) and info["labels_next_offset"] == 3
    assert sum(t["classes"] for t in info["tasks"]) == len(labels)
    assert c.get("/v1/model?labels_limit=0").status_code == 422
    image = base64.b64encode(_png(next(tasks[0]["test"].rglob("*.png")))).decode()
    first = min(v for v, st in states.items() if st != "broken")
    r = c.post(f"/classify?version={first}", json={"images": [image]})
    assert r.status_code == 200 and r.json()["model_version"] == first
    assert c.post("/classify?version=999", json={"images": [image]}).status_code == 404
    assert c.post("/classify?version=1e3", json={"images": [image]}).status_code == 422
    refused = [v for v, st in states.items() if st == "broken"]  # the corrupt version of the test above
    if refused:
        r = c.post(f"/classify?version={refused[0]}", json={"images": [image]})
        assert r.status_code == 409 and "sha256" in r.json()["error"]


def _redeploy(server, **settings):
    """Change the running application's user_config (Serve reconfigures the replicas in place)."""
    from ray import serve

    from cl_serve.serving.app import build_app

    serve.run(build_app(str(server["store"]), **APP_KWARGS, settings={"max_queued_requests": MAX_QUEUED, **settings}),
              name="cl-serve", route_prefix="/", blocking=False)


def test_the_canary_sends_its_share_of_requests_to_the_newest_candidate(server, tasks, monkeypatch, tmp_path):
    from cl_serve.workflow import release_gate
    from cl_serve.trainer.synthetic import class_names, write_image_folder

    c, store = server["client"], server["store"]
    live = _ensure_live(server, tasks)
    refuse = lambda *a, **k: {"passed": False, "reasons": ["refused for the canary test"], "tasks": [],  # noqa: E731
                              "max_drop": 0.05, "min_new_accuracy": 0.0}
    monkeypatch.setattr(release_gate, "decide", refuse)
    pipeline.set_policy(store, gate_data=tasks[0]["test"])
    known = set(Store(store).manifest(live).labels)
    names = [n for n in class_names(40) if n not in known][:3]  # classes the store has not seen
    new_task = write_image_folder(tmp_path / "canary", names, 8, seed=7)
    try:
        candidate = pipeline.add_task(store, new_task, fast_train(epochs=1), progress=False).version
    finally:
        pipeline.set_policy(store, off=True)
    assert Store(store).current() == live and candidate > live
    image = base64.b64encode(_png(next(new_task.rglob("*.png")))).decode()

    def answers(n: int) -> list[tuple[int, bool]]:
        out = []
        for _ in range(n):
            r = c.post("/classify", json={"images": [image]})
            assert r.status_code == 200, r.text
            out.append((r.json()["model_version"], r.json()["canary"]))
        return out

    assert set(answers(10)) == {(live, False)}  # no canary by default
    try:
        _redeploy(server, canary_percent=100)
        deadline = time.time() + 30
        while answers(1) != [(candidate, True)] and time.time() < deadline:
            time.sleep(0.2)
        assert set(answers(10)) == {(candidate, True)}
        _redeploy(server, canary_percent=50)
        time.sleep(1.0)
        mixed = answers(40)
        assert set(mixed) == {(live, False), (candidate, True)}
        assert 5 <= sum(canary for _, canary in mixed) <= 35, mixed  # binomial(40, 0.5): outside has p < 1e-6
    finally:
        _redeploy(server)
    deadline = time.time() + 30
    while answers(1) != [(live, False)] and time.time() < deadline:
        time.sleep(0.2)
    assert set(answers(10)) == {(live, False)}
    assert c.get("/healthz").json()["version"] == live


def test_metrics_are_exported_on_rays_prometheus_endpoint(server, tasks):
    c = server["client"]
    _ensure_live(server, tasks)
    image = base64.b64encode(_png(next(tasks[0]["test"].rglob("*.png")))).decode()

    ok = lambda m: metric_total(m, "ray_cl_serve_requests_total", 'status="200"')  # noqa: E731
    before = scrape_metrics(server["metrics"])
    for _ in range(5):
        assert c.post("/classify", json={"images": [image]}).status_code == 200
    c.post("/classify", json={"images": ["%%%"]})
    deadline, after = time.time() + 40, before
    while time.time() < deadline:
        after = scrape_metrics(server["metrics"])
        if ok(after) >= ok(before) + 5:
            break
        time.sleep(1)
    assert ok(after) >= ok(before) + 5, sorted(after)[:20]
    assert metric_total(after, "ray_cl_serve_requests_total", 'status="400"') >= 1
    assert metric_total(after, "ray_cl_serve_request_latency_ms_count") >= 6
    assert metric_total(after, "ray_cl_serve_batch_images_count") >= 5
    assert metric_total(after, "ray_cl_serve_swaps_total") >= 1
    assert metric_total(after, "ray_cl_serve_live_version") >= 1


def test_overload_is_turned_away_fast_with_retry_after_while_admitted_requests_succeed(server, tasks):
    _ensure_live(server, tasks)
    files = [("file", (p.name, _png(p), "image/png")) for p in sorted(tasks[0]["test"].rglob("*.png"))[:16]]
    results: list[tuple[int, float, str]] = []

    def one():
        with httpx.Client(base_url=server["url"], timeout=120, headers=AUTH) as cl:
            t0 = time.monotonic()
            r = cl.post("/classify", files=files)
            results.append((r.status_code, time.monotonic() - t0, r.headers.get("retry-after", "")))

    threads = [threading.Thread(target=one) for _ in range(48)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = [r for r in results if r[0] == 200]
    busy = [r for r in results if r[0] == 503]
    print(f"\noverload: 48 concurrent requests of 16 images, max_queued_requests={MAX_QUEUED}: {len(ok)} answered "
          f"(slowest {max(r[1] for r in ok):.2f}s), {len(busy)} turned away "
          f"(slowest {max((r[1] for r in busy), default=0):.2f}s)")
    assert len(ok) + len(busy) == 48 and ok and busy
    assert all(r[2] == "1" for r in busy)
    assert max(r[1] for r in busy) < min(max(r[1] for r in ok), 5.0)


def test_a_slowloris_of_64_connections_does_not_deny_service(server, tasks):
    """64 connections send the headers of POST /classify (Content-Length 1000) and one body byte, then stall: the
    body is read outside the in-flight count under body_timeout_s, so legitimate requests are still answered (not
    503 "server busy"), /healthz stays fast, and every stalled upload gets 408 when its deadline passes."""
    _ensure_live(server, tasks)
    _redeploy(server, body_timeout_s=4.0)
    time.sleep(2.0)
    host, port = server["url"].split("//")[1].split(":")
    try:
        with StalledUploads(host, port, TOKEN) as stalled:
            time.sleep(0.5)
            image = _png(next(tasks[0]["test"].rglob("*.png")))
            c = server["client"]
            times, statuses = [], []
            for _ in range(6):
                t0 = time.monotonic()
                statuses.append(c.post("/classify", files={"file": ("x.png", image, "image/png")}).status_code)
                times.append(time.monotonic() - t0)
                t0 = time.monotonic()
                assert c.get("/healthz").status_code == 200
                times.append(time.monotonic() - t0)
            print(f"\nslowloris of 64: {statuses}, slowest answer {max(times):.2f}s")
            assert statuses == [200] * 6  # main: 503 "server busy" for the whole 30 s request timeout
            assert max(times) < 10.0  # a generous bound on a shared machine; measured 1.8 s with the CPUs busy
            assert stalled.statuses() == [b"408"] * 64
    finally:
        _redeploy(server)


def test_gpu_path_prefers_tensorrt_then_cuda_and_the_fp16_file_on_a_gpu(tmp_path):
    from cl_serve.serving.model import choose_onnx_file, onnx_providers
    from cl_serve.serving.app import build_app
    from cl_serve.store.model_store import Manifest

    every = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    assert onnx_providers(every, gpu_present=True) == every
    assert onnx_providers(every[1:], gpu_present=True) == every[1:]
    assert onnx_providers(every, gpu_present=False) == ["CPUExecutionProvider"]
    m = Manifest(version=1, parent=None, task_index=0, labels=["a"], tasks=[], backbone={"timm_model": "vit"},
                 method={"name": "none"},
                 preprocessing={"input_size": 32, "scale_size": 36, "mean": (0, 0, 0), "std": (1, 1, 1)},
                 onnx={"file": "model.onnx", "opset": 18},
                 onnx_fp16={"file": "model.fp16.0123456789ab.onnx", "opset": 18, "dtype": "float16"},
                 files={"model.onnx": "0" * 64, "model.fp16.0123456789ab.onnx": "0" * 64})
    assert choose_onnx_file(m, every[1:]) == "model.fp16.0123456789ab.onnx"
    assert choose_onnx_file(m, ["CPUExecutionProvider"]) == "model.onnx"
    app = build_app(str(tmp_path), gpus_per_replica=0.5)
    assert app._bound_deployment.ray_actor_options["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="unknown server settings"):
        build_app(str(tmp_path), settings={"max_queue": 3})


def test_the_page_classifies_an_uploaded_image_in_a_real_browser(server, tasks, tmp_path):
    import shutil

    from cl_serve.workflow.demo_serving import headless_chromium
    from cl_serve.base.errors import UserError

    live = _ensure_live(server, tasks)
    labels = Store(server["store"]).manifest(live).labels
    image = tmp_path / "upload.png"
    shutil.copy(next(tasks[0]["test"].rglob("*.png")), image)
    try:
        driver = headless_chromium("1280,900")
    except UserError as e:
        pytest.skip(f"{e} (.ci/run installs them)")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        driver.get(server["url"] + "/")
        token = driver.find_element(By.ID, "token")
        token.send_keys(TOKEN)
        driver.execute_script("arguments[0].dispatchEvent(new Event('change'))", token)
        wait = WebDriverWait(driver, 60)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#versions tr[data-version]"))
        assert f"live version: {live}" in driver.find_element(By.ID, "live").text
        driver.find_element(By.ID, "files").send_keys(str(image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#results .prediction .label"))
        label = driver.find_element(By.CSS_SELECTOR, "#results .prediction .label").text
        answered = driver.find_element(By.CSS_SELECTOR, "#results .prediction").get_attribute("data-version")
        rows = driver.find_elements(By.CSS_SELECTOR, "#versions tr[data-version]")
        shot = tmp_path / "page.png"
        driver.save_screenshot(str(shot))
        print(f"\npage: predicted {label!r} with version {answered}; screenshot {shot}")
    finally:
        driver.quit()
    assert label in labels and int(answered) == live and len(rows) == len(Store(server["store"]).versions())
    assert shot.stat().st_size > 10_000
