"""The Open Inference Protocol on a real server: real Ray Serve and ONNX Runtime, driven by the unmodified upstream
`tritonclient.http` (its defaults: binary tensors) and by raw HTTP for what a client library would not send.
The same model, bounds and token as /classify: the answer matches /classify's, hostile bodies and the hostile
image corpus of benchmarks/hostile.py get a 4xx (never a 5xx) and the replica keeps serving. The server runs with
`--precision int8`: the live version's int8 file answers, the version without one answers from its fp32 file; and
with `--direct-port`: the replica answers the same routes itself (Ray Serve's direct ingress), with the same answers,
bounds and token as through the proxy."""
import base64
import json
import os
import time

import httpx
import numpy as np
import pytest
from PIL import Image

from benchmarks.hostile import hostile_cases
from cl_serve.contract.preprocessing import preprocess_image
from cl_serve.store.model_store import Store
from cl_serve.workflow import pipeline
from cl_serve.workflow.quantization import quantize_version
from tests.conftest import StalledUploads, fast_train, init_tiny_store, metric_total, scrape_metrics
from tests.test_open_inference import HOSTILE

httpclient = pytest.importorskip("tritonclient.http")
from tritonclient.utils import InferenceServerException  # noqa: E402

pytestmark = pytest.mark.serving
TOKEN = "v2-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NAME = "classifier"


def auth() -> dict:
    """A fresh headers dict per call: tritonclient adds Inference-Header-Content-Length to the dict it is given."""
    return dict(AUTH)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tasks):
    from cl_serve.serving import launch as serve_cli

    store = init_tiny_store(tmp_path_factory.mktemp("v2") / "store", "none")
    pipeline.add_task(store, tasks[0]["train"], fast_train(), progress=False)
    pipeline.add_task(store, tasks[1]["train"], fast_train(), progress=False)
    # served with --precision int8: version 2 has an int8 file (bounds opened: a tiny random model), version 1 none
    quantize_version(store, gate_data=str(tasks[1]["seen"]), min_agreement=0.0, max_drop=1.0)
    port, direct, metrics_port = serve_cli.free_ports(3)
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # Ray's processes inherit it: metrics within a second
    serve_cli.start(str(store), port=port, num_cpus=2, poll_interval_s=0.2, max_request_bytes=2_000_000,
                    auth_token=TOKEN, precision="int8", direct_port=direct, metrics_port=metrics_port)
    url = f"http://127.0.0.1:{port}"
    serve_cli.wait_until_healthy(f"http://127.0.0.1:{direct}", timeout_s=60)
    with httpx.Client(base_url=url, timeout=60, headers=auth()) as client, \
            httpx.Client(base_url=f"http://127.0.0.1:{direct}", timeout=60, headers=auth()) as direct_client:
        deadline = time.time() + 60
        while client.get("/healthz").json().get("version") != 2 and time.time() < deadline:
            time.sleep(0.1)
        triton = httpclient.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=60)
        triton_direct = httpclient.InferenceServerClient(f"127.0.0.1:{direct}", network_timeout=60)
        yield {"store": store, "client": client, "url": url, "triton": triton, "direct": direct_client,
               "triton_direct": triton_direct, "metrics": f"http://127.0.0.1:{metrics_port}/metrics"}
        triton.close()
        triton_direct.close()
    serve_cli.stop()
    assert "RAY_SERVE_ENABLE_DIRECT_INGRESS" not in os.environ  # a later server in this process is not direct


def _pngs(tasks, n=4) -> list[bytes]:
    paths = sorted(p for d in (tasks[0]["test"], tasks[1]["test"]) for p in d.rglob("*.png"))[::5][:n]
    return [p.read_bytes() for p in paths]


def _images(blobs, binary=True):
    t = httpclient.InferInput("images", [len(blobs)], "BYTES")
    t.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return t


def test_tritonclient_with_its_defaults_gets_the_classify_answer(server, tasks):
    triton, c = server["triton"], server["client"]
    blobs = _pngs(tasks)
    result = triton.infer(NAME, [_images(blobs)], headers=auth())  # no outputs named: every output, binary
    top = [v.decode() for v in result.as_numpy("labels")[:, 0]]
    probs = result.as_numpy("probabilities")
    r = c.post("/classify", json={"images": [base64.b64encode(b).decode() for b in blobs]})
    assert r.status_code == 200, r.text
    expected = r.json()["predictions"]
    assert top == [p["label"] for p in expected]
    assert probs.argmax(1).tolist() == [p["class_id"] for p in expected]
    assert np.allclose(probs.max(1), [p["score"] for p in expected], atol=1e-5)
    assert result.get_response()["model_version"] == "2"


def test_json_and_preprocessed_pixels_give_the_same_probabilities(server, tasks):
    triton = server["triton"]
    blobs = _pngs(tasks, 2)
    binary = triton.infer(NAME, [_images(blobs)], headers=auth()).as_numpy("probabilities")
    as_json = triton.infer(NAME, [_images([base64.b64encode(b) for b in blobs], binary=False)], headers=auth(),
                           outputs=[httpclient.InferRequestedOutput("probabilities", binary_data=False)])
    np.testing.assert_allclose(as_json.as_numpy("probabilities"), binary, atol=1e-6)
    meta = triton.get_model_metadata(NAME, headers=auth())
    p = Store(server["store"]).manifest(2).preprocessing
    assert meta["parameters"]["preprocessing"]["input_size"] == p.input_size
    assert {i["name"]: i["shape"] for i in meta["inputs"]}["pixels"] == [-1, 3, p.input_size, p.input_size]
    import io
    x = np.stack([preprocess_image(Image.open(io.BytesIO(b)), p) for b in blobs]).astype(np.float32)
    t = httpclient.InferInput("pixels", list(x.shape), "FP32")
    t.set_data_from_numpy(x)
    pixels = triton.infer(NAME, [t], headers=auth()).as_numpy("probabilities")
    np.testing.assert_allclose(pixels, binary, atol=1e-5)
    out = httpclient.InferRequestedOutput("probabilities", class_count=2)
    classes = triton.infer(NAME, [t], outputs=[out], headers=auth()).as_numpy("probabilities")
    assert classes.shape == (2, 2) and int(classes[0, 0].decode().split(":")[1]) == int(binary[0].argmax())


def test_versions_metadata_readiness_and_errors(server, tasks):
    triton = server["triton"]
    assert triton.is_server_live() and triton.is_server_ready()  # probes: no token
    assert triton.is_model_ready(NAME, headers=auth()) and triton.is_model_ready(NAME, "1", headers=auth())
    assert not triton.is_model_ready(NAME, "99", headers=auth())
    assert triton.get_server_metadata(headers=auth())["extensions"] == ["binary_tensor_data", "classification"]
    meta = triton.get_model_metadata(NAME, "1", headers=auth())
    assert meta["versions"] == ["1", "2"] and meta["parameters"]["version"] == 1
    assert meta["outputs"][0]["shape"][1] == len(Store(server["store"]).manifest(1).labels)
    v1 = triton.infer(NAME, [_images(_pngs(tasks, 1))], model_version="1", headers=auth())
    assert v1.get_response()["model_version"] == "1"
    assert v1.as_numpy("probabilities").shape[1] == meta["outputs"][0]["shape"][1]
    for call, status in [(lambda: triton.infer("other", [_images(_pngs(tasks, 1))], headers=auth()), "404"),
                         (lambda: triton.infer(NAME, [_images(_pngs(tasks, 1))], model_version="99",
                                               headers=auth()), "404"),
                         (lambda: triton.infer(NAME, [_images(_pngs(tasks, 1))]), "401"),
                         (lambda: triton.get_model_metadata("other", headers=auth()), "404"),
                         (lambda: triton.infer(NAME, [_images([b"not an image"])], headers=auth()), "415")]:
        with pytest.raises(InferenceServerException) as e:
            call()
        assert e.value.status() == status, (status, e.value)


def _v2_binary(blobs: list[bytes]) -> tuple[bytes, dict]:
    data = b"".join(len(b).to_bytes(4, "little") + b for b in blobs)
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [len(blobs)],
                                     "parameters": {"binary_data_size": len(data)}}]}).encode()
    return header + data, {"Inference-Header-Content-Length": str(len(header))}


@pytest.mark.parametrize("ingress", ["client", "direct"])
def test_hostile_bodies_and_images_get_a_4xx_and_the_replica_keeps_serving(server, tasks, ingress):
    c = server[ingress]
    good = _pngs(tasks, 1)[0]
    requests = {f"v2 {name}": (body, {} if length is None else {"Inference-Header-Content-Length": length})
                for name, (body, length) in HOSTILE.items()}
    for name, kwargs in hostile_cases(good).items():  # every hostile image of the corpus, as a v2 BYTES input
        files = kwargs.get("files")
        if files and any(f[1][1] != good for f in files):
            requests[f"corpus {name}"] = _v2_binary([f[1][1] for f in files])
    requests["65 images"] = _v2_binary([good] * 65)
    requests["body over max_request_bytes"] = _v2_binary([b"x" * 2_100_000])
    worst = (0.0, "")
    for name, (body, headers) in requests.items():
        t0 = time.monotonic()
        r = c.post(f"/v2/models/{NAME}/infer", content=body, headers=headers)
        worst = max(worst, (time.monotonic() - t0, name))
        assert 400 <= r.status_code < 500, (name, r.status_code, r.text[:300])
        assert "error" in r.json(), name
    print(f"\n{len(requests)} hostile /v2 requests: slowest {worst[1]!r} {worst[0]:.2f}s")
    body, headers = _v2_binary([good])
    assert c.post(f"/v2/models/{NAME}/infer", content=body, headers=headers).status_code == 200


def test_precision_int8_serves_the_int8_file_and_fp32_where_a_version_has_none(server, tasks):
    c = server["client"]
    m = Store(server["store"]).manifest(2)
    assert c.get("/v1/model").json()["onnx_file"] == m.onnx_file(precision="int8") != m.onnx_file()
    assert c.get("/healthz").json()["onnx_file"] == m.onnx_file(precision="int8")
    r = c.post("/classify?version=1", json={"images": [base64.b64encode(_pngs(tasks, 1)[0]).decode()]})
    assert r.status_code == 200 and r.json()["model_version"] == 1  # no int8 file: its fp32 one answers


def test_direct_ingress_gives_the_proxys_answers_with_its_token(server, tasks):
    blobs = _pngs(tasks, 3)
    outputs = [httpclient.InferRequestedOutput("probabilities")]
    via_proxy = server["triton"].infer(NAME, [_images(blobs)], outputs=outputs, headers=auth())
    direct = server["triton_direct"].infer(NAME, [_images(blobs)], outputs=outputs, headers=auth())
    np.testing.assert_allclose(direct.as_numpy("probabilities"), via_proxy.as_numpy("probabilities"), atol=1e-6)
    body = {"images": [base64.b64encode(b).decode() for b in blobs]}
    a, b = server["client"].post("/classify", json=body).json(), server["direct"].post("/classify", json=body).json()
    assert [p["label"] for p in a["predictions"]] == [p["label"] for p in b["predictions"]]
    assert a["model_version"] == b["model_version"] == 2
    r = httpx.post(f"{server['direct'].base_url}/classify", json=body)  # no token
    assert r.status_code == 401
    with pytest.raises(InferenceServerException):
        server["triton_direct"].infer(NAME, [_images(blobs)])  # no token either


def test_direct_ports_are_one_per_replica_and_refused_past_the_last_port():
    from cl_serve.base.errors import UserError
    from cl_serve.serving.launch import direct_ingress_env

    env = direct_ingress_env(9100, 3)
    # Serve allocates range(MIN, MAX): 9100-9102 for HTTP, 9103-9105 for gRPC
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == ("9100", "9103")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == ("9103", "9106")
    with pytest.raises(UserError, match="65536"):
        direct_ingress_env(65534, 2)


def test_a_slowloris_on_the_direct_port_does_not_deny_service(server, tasks):
    """64 stalled uploads straight to the replica: legitimate requests are answered, every stalled one gets 408 at
    body_timeout_s (10 s by default), as through the proxy (tests/test_server.py)."""
    host, port = str(server["direct"].base_url).split("//")[1].rstrip("/").split(":")
    with StalledUploads(host, port, TOKEN) as stalled:
        time.sleep(0.5)
        body = {"images": [base64.b64encode(_pngs(tasks, 1)[0]).decode()]}
        t0 = time.monotonic()
        statuses = [server["direct"].post("/classify", json=body).status_code for _ in range(4)]
        assert statuses == [200] * 4 and time.monotonic() - t0 < 10.0
        assert stalled.statuses() == [b"408"] * 64


@pytest.mark.parametrize("ingress", ["direct", "client"])
def test_requests_whose_client_left_are_not_computed(server, tasks, ingress):
    """40 requests of four 12-megapixel PNGs each (about 0.3 s of decoding per request here, two requests decoding
    at once), sent whole, then their connections closed after 0.3 s: Ray Serve cancels each request whose client
    left, through the proxy and on the direct port; the replica stops waiting for a decode slot and the model, the
    batcher drops it, and the metrics count it (client_gone, status 499): the abandoned images are not computed."""
    import io
    import socket

    pixels = np.zeros((3000, 4000, 3), np.uint8)
    pixels[::7], pixels[:, ::5] = 255, 80
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    body = json.dumps({"images": [base64.b64encode(buf.getvalue()).decode()] * 4}).encode()
    host, port = str(server[ingress].base_url).split("//")[1].rstrip("/").split(":")
    head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    before = scrape_metrics(server["metrics"])
    socks = [socket.create_connection((host, int(port)), timeout=30) for _ in range(40)]
    for s in socks:
        s.sendall(head + body)
    time.sleep(0.3)
    for s in socks:
        s.close()  # as a client that times out does: FIN, not a reset
    gone = lambda m: metric_total(m, "ray_cl_serve_rejected_overload_total", 'reason="client_gone"')  # noqa: E731
    answered = lambda m: metric_total(m, "ray_cl_serve_requests_total")  # noqa: E731
    deadline, after = time.time() + 60, before
    while time.time() < deadline:  # every request accounted for: answered (into a closed socket) or given up
        after = scrape_metrics(server["metrics"])
        if answered(after) - answered(before) >= 40:
            break
        time.sleep(1)
    assert answered(after) - answered(before) >= 40, "not every abandoned request was accounted for"
    computed = metric_total(after, "ray_cl_serve_batch_images_sum") - metric_total(before, "ray_cl_serve_batch_images_sum")
    assert gone(after) - gone(before) >= 20
    assert computed <= 4 * 20, f"{computed:.0f} of {40 * 4} abandoned images were computed"
    small = base64.b64encode(_pngs(tasks, 1)[0]).decode()
    assert server[ingress].post("/classify", json={"images": [small]}).status_code == 200
