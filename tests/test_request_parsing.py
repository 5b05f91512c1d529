"""Request parsing and decoding bounds, without Ray: a hostile body costs a byte count, not a parse."""
import base64
import io
import json
import time

import pytest
from PIL import Image

from cl_serve.runtime import BadInput
from cl_serve.server import parse_classify_json
from exports.image_decode import ImageLimits, ImageRejected, open_bounded


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def test_a_valid_body_parses():
    body = json.dumps({"images": [base64.b64encode(_png()).decode()] * 3, "top_k": 2}).encode()
    payload = parse_classify_json(body, max_images=64)
    assert len(payload.images) == 3 and payload.top_k == 2


@pytest.mark.parametrize("elements", [2_000_000, 4_000_000])
def test_a_huge_json_array_is_refused_from_its_byte_counts(elements):
    body = b'{"images": [' + b",".join([b"1"] * elements) + b"]}"
    t0 = time.perf_counter()
    with pytest.raises(BadInput) as e:
        parse_classify_json(body, max_images=64)
    took = time.perf_counter() - t0
    assert e.value.status == 413 and "at most 64 images" in e.value.message
    assert took < 0.5, took  # measured ~0.01 s for 4 M elements (an 8 MB body); main took 57 s and +4.2 GiB
    print(f"\n{elements} elements refused in {took * 1000:.1f} ms")


@pytest.mark.parametrize("body, status", [
    (b"[" * 200_000 + b"]" * 200_000, 422),
    (b'{"images": [[1], [2]]}', 422),
    (b'{"images": ["AAAA"], "top_k": 1e999}', 422),
    (b'{"images": [1]}', 422),
    (b"{not json", 400),
])
def test_malformed_bodies_get_a_4xx(body, status):
    with pytest.raises(BadInput) as e:
        parse_classify_json(body, max_images=64)
    assert e.value.status == status, e.value.message


def _gif_with_comment(blocks: int) -> bytes:
    head = b"GIF89a" + (1).to_bytes(2, "little") * 2 + b"\x00\x00\x00"
    return head + b"\x21\xfe" + b"\x01A" * blocks + b"\x00;"


@pytest.mark.parametrize("data, status, why", [
    (b"\xff\xd8" + b"\xff\xe1\x00\x02" * 2_000_000, 400, "segments before the frame header"),
    (b"\xff\xd8\xff\xe0\x00\x02" + b"\xff" * 5_000_000, 400, "fill bytes"),
    (_gif_with_comment(1_000_000), 415, "accepted: JPEG, PNG, WEBP"),
    (b"BM" + b"\x00" * 100, 415, "accepted: JPEG, PNG, WEBP"),
    (b"%PDF-1.4 hello", 415, "unknown signature"),
])
def test_hostile_files_are_refused_before_pillow_runs(data, status, why):
    t0 = time.perf_counter()
    with pytest.raises(ImageRejected) as e:
        open_bounded(data, ImageLimits())
    assert e.value.status == status and why in e.value.message, e.value.message
    assert time.perf_counter() - t0 < 0.5


def test_formats_are_an_allow_list():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "GIF")
    with pytest.raises(ImageRejected):
        open_bounded(buf.getvalue(), ImageLimits())
    assert open_bounded(buf.getvalue(), ImageLimits(formats=("GIF",))).size == (8, 8)
    jpeg = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(jpeg, "JPEG", progressive=True)
    assert open_bounded(jpeg.getvalue(), ImageLimits()).size == (16, 16)
    assert open_bounded(_png(), ImageLimits()).size == (8, 8)


def test_the_schema_says_what_the_server_accepts():
    """An empty image string is refused by the schema itself, so /openapi.json (minLength 1) and the server agree."""
    from cl_serve.api_models import ClassifyJSON

    item = ClassifyJSON.model_json_schema()["properties"]["images"]["items"]
    assert item.get("minLength") == 1
    with pytest.raises(BadInput) as e:
        parse_classify_json(b'{"images": [""]}', max_images=64)
    assert e.value.status == 422
