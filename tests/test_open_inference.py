"""The Open Inference Protocol codec without a server: requests written by the upstream `tritonclient` (binary
extension and JSON, both inputs) parse to what was sent, responses we write are read back by tritonclient's own
parser, and malformed or oversized requests get a 4xx before anything is allocated from a number they declare.
The routes themselves run against a real server in tests/test_open_inference_server.py."""
import base64
import json
import struct

import numpy as np
import pytest

from cl_serve.serving.model import BadInput
from cl_serve.serving.open_inference import (InferRequest, Output, encode_response, model_metadata, parse_infer,
                                             server_metadata)

httpclient = pytest.importorskip("tritonclient.http")
SIZE, MAX_IMAGES = 8, 4


def _triton_body(inputs, outputs=None, **kw) -> tuple[bytes, str | None]:
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs, outputs=outputs, **kw)
    return body, None if json_size is None else str(json_size)


def _images_input(blobs, binary=True):
    t = httpclient.InferInput("images", [len(blobs)], "BYTES")
    t.set_data_from_numpy(np.array(blobs, dtype=np.object_), binary_data=binary)
    return t


def _parse(body, header_length=None):
    return parse_infer(body, header_length, input_size=SIZE, max_images=MAX_IMAGES)


def _status(body, header_length=None) -> int:
    with pytest.raises(BadInput) as e:
        _parse(body, header_length)
    return e.value.status


def test_tritonclient_binary_bytes_input_and_default_outputs():
    blobs = [b"\x89PNG\r\n\x1a\n" + bytes(range(256)), b"\xff\xd8\xff" + b"\x00" * 10]
    req = _parse(*_triton_body([_images_input(blobs)], request_id="r1"))
    assert req.images == blobs and req.pixels is None and req.id == "r1"
    # no outputs named: tritonclient asks for every output in binary
    assert [(o.name, o.binary) for o in req.outputs] == [("probabilities", True), ("labels", True)]


def test_json_bytes_are_base64_and_outputs_are_honoured():
    blobs = [b"\x00\x01 not utf-8 \xff"]
    body = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1, 1],
                                   "data": [base64.b64encode(blobs[0]).decode()]}],
                       "outputs": [{"name": "labels", "parameters": {"binary_data": False}}],
                       "parameters": {"top_k": 3}}).encode()
    req = _parse(body)
    assert req.images == blobs and req.top_k == 3
    assert [(o.name, o.binary) for o in req.outputs] == [("labels", False)]


@pytest.mark.parametrize("binary", [True, False])
def test_fp32_pixels_from_tritonclient(binary):
    x = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    t = httpclient.InferInput("pixels", list(x.shape), "FP32")
    t.set_data_from_numpy(x, binary_data=binary)
    out = httpclient.InferRequestedOutput("probabilities", binary_data=binary, class_count=2)
    req = _parse(*_triton_body([t], outputs=[out]))
    np.testing.assert_array_equal(req.pixels, x)
    assert req.outputs == [Output("probabilities", binary, 2)]


@pytest.mark.parametrize("binary", [True, False])
def test_responses_read_back_by_tritonclient(binary):
    logits = np.array([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], np.float32)
    labels = ["cat", "dog", "émeu"]
    req = InferRequest(id="x", outputs=[Output("probabilities", binary), Output("labels", binary)], top_k=2)
    body, headers = encode_response(req, model_name="m", version=7, canary=False, logits=logits, labels=labels,
                                    default_top_k=5)
    length = headers.get("Inference-Header-Content-Length")
    assert (length is not None) == binary
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=length and int(length))
    probs = result.as_numpy("probabilities")
    assert probs.shape == (2, 3) and np.allclose(probs.sum(1), 1) and probs.argmax(1).tolist() == [1, 0]
    top = result.as_numpy("labels")
    assert top.shape == (2, 2) and [v.decode() if isinstance(v, bytes) else v for v in top[:, 0]] == ["dog", "cat"]
    assert result.get_response()["model_version"] == "7" and result.get_response()["id"] == "x"


def test_classification_extension_gives_score_index_label():
    req = InferRequest(id=None, outputs=[Output("probabilities", True, 2)])
    body, headers = encode_response(req, model_name="m", version=1, canary=True,
                                    logits=np.array([[0.0, 5.0, 1.0]], np.float32), labels=["a", "b", "c"],
                                    default_top_k=5)
    result = httpclient.InferenceServerClient.parse_response_body(
        body, header_length=int(headers["Inference-Header-Content-Length"]))
    first, second = (v.decode() for v in result.as_numpy("probabilities")[0])
    assert first.endswith(":1:b") and second.endswith(":2:c") and float(first.split(":")[0]) > 0.9
    assert result.get_response()["parameters"]["canary"] is True


def _binary_images(elements: bytes, shape=(1,), declared=None) -> tuple[bytes, str]:
    header = json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": list(shape),
                                     "parameters": {"binary_data_size": len(elements) if declared is None
                                                    else declared}}]}).encode()
    return header + elements, str(len(header))


def _pixels_json(n=1, data=None) -> bytes:
    count = n * 3 * SIZE * SIZE
    return json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [n, 3, SIZE, SIZE],
                                   "data": [0.5] * count if data is None else data}]}).encode()


HOSTILE = {
    "empty body": (b"", None),
    "header length past the body": (b'{"inputs": []}', "999999"),
    "header length not a number": (b'{"inputs": []}', "12abc"),
    "header length zero": (b'{"inputs": []}', "0"),
    "header not JSON": (b"\x00" * 10, "10"),
    "nested 100000 deep": (b"[" * 100_000 + b"]" * 100_000, None),
    "no inputs": (b'{"inputs": []}', None),
    "two inputs": (json.dumps({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}] * 2
                               }).encode(), None),
    "unknown input": (b'{"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]}', None),
    "unknown output": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],'
                       b' "outputs": [{"name": "secrets"}]}', None),
    "classification on labels": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": '
                                 b'["AA=="]}], "outputs": [{"name": "labels", "parameters": {"classification": 2}}]}',
                                 None),
    "images as FP32": (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1.0]}]}', None),
    "shape says 5 images": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [5], "data": ["AA=="]}]}',
                            None),
    "shape of 10^12 images": _binary_images(struct.pack("<I", 1) + b"x", shape=(10 ** 12,)),
    "negative shape": _binary_images(struct.pack("<I", 1) + b"x", shape=(-1,)),
    "not base64": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]}', None),
    "element length 4 GB": _binary_images(struct.pack("<I", 2 ** 32 - 1) + b"x"),
    "element length cut": _binary_images(b"\x05\x00"),
    "more elements than the shape": _binary_images((struct.pack("<I", 1) + b"x") * 2),
    "binary_data_size past the body": _binary_images(struct.pack("<I", 1) + b"x", declared=10 ** 9),
    "binary_data_size short of the body": _binary_images(struct.pack("<I", 1) + b"x" + b"extra", declared=5),
    "binary_data_size negative": _binary_images(b"", declared=-5),
    "pixels NaN in JSON": (_pixels_json(data=[float("nan")] * 3 * SIZE * SIZE), None),
    "pixels NaN in binary": (lambda h: (h + np.full(3 * SIZE * SIZE, np.nan, "<f4").tobytes(), str(len(h))))(
        json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, SIZE, SIZE],
                                "parameters": {"binary_data_size": 4 * 3 * SIZE * SIZE}}]}).encode()),
    "pixels of another size": (json.dumps({"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 4, 4],
                                                       "data": [0.0] * 48}]}).encode(), None),
    "pixels short of their shape": (_pixels_json(data=[0.0] * 10), None),
    "pixels as strings": (_pixels_json(data=["a"] * 3 * SIZE * SIZE), None),
    "5 pixel images": (_pixels_json(n=5), None),
    "top_k 10^9": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],'
                   b' "parameters": {"top_k": 1000000000}}', None),
    "binary_data_output a string": (b'{"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": '
                                    b'["AA=="]}], "parameters": {"binary_data_output": "yes"}}', None),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_malformed_requests_get_a_4xx(name):
    status = _status(*HOSTILE[name])
    assert 400 <= status < 500, (name, status)


def test_too_many_elements_are_refused_before_parsing():
    count = (MAX_IMAGES * 3 * SIZE * SIZE) + 200
    body = b'{"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [' + \
        b",".join([b"0"] * count) + b"]}]}"
    assert _status(body) == 413


def test_metadata_documents():
    meta = model_metadata("m", 3, [1, 2, 3], 10, {"input_size": 224, "mean": [0.5] * 3})
    assert meta["versions"] == ["1", "2", "3"] and meta["outputs"][0]["shape"] == [-1, 10]
    assert {i["name"]: i["shape"] for i in meta["inputs"]} == {"images": [-1], "pixels": [-1, 3, 224, 224]}
    assert "binary_tensor_data" in server_metadata("0")["extensions"]
