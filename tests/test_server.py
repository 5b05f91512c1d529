"""The served product: real Ray Serve, real ONNX Runtime, a real HTTP client on 127.0.0.1.

One server for the module, started on an empty store: 503 first, then versions are published while it runs.
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

from cl_serve import pipeline
from cl_serve.store import Store, vname
from exports.preprocessing import preprocess_image
from tests.conftest import fast_train, init_tiny_store

pytestmark = pytest.mark.serving


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cl_serve import serve_cli

    store = init_tiny_store(tmp_path_factory.mktemp("served") / "store", "sdlora")
    port = serve_cli.free_port()
    serve_cli.start(str(store), port=port, num_cpus=2, poll_interval_s=0.2, max_batch_size=16,
                    max_request_bytes=2_000_000)
    url = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"store": store, "client": client}
    serve_cli.stop()


def _png(path) -> bytes:
    return open(path, "rb").read()


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
        "bad top_k": (dict(json={"images": [base64.b64encode(good).decode()], "top_k": "many"}), 400),
    }
    for name, (kwargs, status) in cases.items():
        r = c.post("/classify", **kwargs)
        assert r.status_code == status, (name, r.status_code, r.text)
        assert "error" in r.json(), name
    r = c.post("/classify", json={"images": [base64.b64encode(good).decode()]})
    assert r.status_code == 200


def test_hot_swap_under_load_has_zero_failed_requests(server, tasks):
    store, c = server["store"], server["client"]
    s = Store(store)
    start_version = s.current()
    image = base64.b64encode(_png(next(tasks[0]["test"].rglob("*.png")))).decode()
    results, stop = [], threading.Event()

    def client_loop(n):
        with httpx.Client(base_url=str(c.base_url), timeout=60) as cl:
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
        v = pipeline.add_task(store, tasks[t]["train"], fast_train(epochs=1), progress=False)["version"]
        published.append((time.time(), v))
        _wait_version(c, v)
    pipeline.rollback(store, start_version)  # ... and a rollback + roll-forward: four swaps in all
    _wait_version(c, start_version)
    t_pub = time.time()
    pipeline.rollback(store, published[-1][1])
    delay = _wait_version(c, published[-1][1])
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
