"""Request parsing and decoding bounds, without Ray: a hostile body costs a byte count, not a parse."""
import base64
import io
import json
import time

import pytest
from PIL import Image

from cl_serve.serving.model import BadInput
from cl_serve.serving.request_parsing import BodyBudget, parse_classify_json, read_body
from cl_serve.contract.image_decode import ImageLimits, ImageRejected, open_bounded


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
    from cl_serve.serving.api_models import ClassifyJSON

    item = ClassifyJSON.model_json_schema()["properties"]["images"]["items"]
    assert item.get("minLength") == 1
    with pytest.raises(BadInput) as e:
        parse_classify_json(b'{"images": [""]}', max_images=64)
    assert e.value.status == 422


def test_freed_heap_memory_is_given_back_once_the_process_grew_past_its_slack():
    """What a replica does when no request is in flight: glibc keeps freed heap pages until malloc_trim."""
    import ctypes
    import sys

    from cl_serve.serving.memory_return import MemoryReturn, resident_mib

    if not sys.platform.startswith("linux") or resident_mib() is None:
        pytest.skip("needs /proc and glibc")
    libc = ctypes.CDLL("libc.so.6")
    # as a long-running replica ends up: glibc's thresholds grow with the sizes it has seen; fix them here so the
    # blocks below sit in the heap and are not trimmed automatically (M_TRIM_THRESHOLD -1, M_MMAP_THRESHOLD -3)
    libc.mallopt(-1, 1 << 30)
    libc.mallopt(-3, 1 << 20)
    try:
        _trim_after_growth(MemoryReturn(slack_mib=32), resident_mib)
    finally:
        libc.mallopt(-1, 128 * 1024)
        libc.mallopt(-3, 128 * 1024)


def _trim_after_growth(keeper, resident_mib):
    import numpy as np

    assert not keeper.give_back_if_grown()  # nothing grew: no trim
    # 150 MB of 100 kB blocks (heap, not mmap), each followed by a small block that stays: the freed space is not
    # at the top of the heap, so only malloc_trim gives it back (as after a decode whose results outlive it)
    chunks, pins = [], []
    for _ in range(1500):
        chunks.append(np.ones(100_000 // 8))
        pins.append(np.ones(4))
    grown = resident_mib()
    del chunks
    assert resident_mib() > grown - 50  # the allocator kept the pages by itself
    assert keeper.give_back_if_grown() and keeper.trims == 1
    assert resident_mib() < grown - 100
    del pins


def test_a_large_image_is_reduced_before_conversion_and_preprocesses_as_the_full_decode_does():
    """The reduction that bounds decode memory must not change what the model sees beyond rounding."""
    import numpy as np

    from cl_serve.contract.preprocessing import Preprocessing, eval_crop

    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (6, 8, 4), dtype=np.uint8)  # content at the scale the model sees, random alpha
    img = Image.fromarray(np.kron(base, np.ones((300, 300, 1), np.uint8)), "RGBA")  # 2400 x 1800
    buf = io.BytesIO()
    img.save(buf, "PNG")
    p = Preprocessing.from_crop_pct(32, 0.875, (0.5,) * 3, (0.5,) * 3)
    reduced = open_bounded(buf.getvalue(), ImageLimits(), min_side=p.scale_size)
    full = open_bounded(buf.getvalue(), ImageLimits(), min_side=0)
    assert reduced.mode == full.mode == "RGB"
    assert min(reduced.size) < min(full.size) // 2 and min(reduced.size) >= 2 * p.scale_size
    diff = np.abs(eval_crop(reduced, p).astype(int) - eval_crop(full, p).astype(int))
    assert diff.mean() < 1.0 and diff.max() <= 24


def _request(body_chunks: list[bytes], headers: dict[str, str]):
    from starlette.requests import Request

    chunks = list(body_chunks)

    async def receive():
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/classify",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    return Request(scope, receive)


def test_request_bodies_share_a_byte_budget_and_give_it_back():
    import asyncio

    budget = BodyBudget(1000)
    body = asyncio.run(read_body(_request([b"x" * 300, b"y" * 300], {"content-length": "600"}), 10_000, budget))
    assert body == b"x" * 300 + b"y" * 300 and budget.used == 0  # given back once read
    budget.take(700)  # other uploads in progress
    with pytest.raises(BadInput) as e:
        asyncio.run(read_body(_request([b"x" * 600], {"content-length": "600"}), 10_000, budget))
    assert e.value.status == 503 and budget.used == 700
    with pytest.raises(BadInput) as e:  # no Content-Length: counted as it arrives
        asyncio.run(read_body(_request([b"x" * 200, b"x" * 200], {}), 10_000, budget))
    assert e.value.status == 503 and budget.used == 700
    budget.give(700)
    with pytest.raises(BadInput) as e:
        asyncio.run(read_body(_request([b"x" * 600], {}), 500, budget))
    assert e.value.status == 413 and budget.used == 0


def test_a_corrupt_cmyk_jpeg_is_a_4xx_not_a_pillow_key_error():
    """Found by the generated corpus (a 500 before the fix): Pillow tried its MPO plugin, never registered."""
    from benchmarks.hostile_corpus import corpus

    case = next(c for c in corpus(b"") if c.name == "JPEG CMYK 33x7 with 8 flipped bytes #1")
    with pytest.raises(ImageRejected) as e:
        open_bounded(case.kwargs["files"][0][1][1], ImageLimits(), min_side=36)
    assert 400 <= e.value.status < 500


@pytest.mark.parametrize("fmt, mode, save", [("WEBP", "RGB", {"lossless": True}),
                                             ("JPEG", "CMYK", {}), ("JPEG", "RGB", {"progressive": True})])
def test_files_decoded_whole_have_their_own_pixel_limit(fmt, mode, save):
    """WebP and progressive or CMYK JPEG cost many bytes per pixel whatever the model needs (a 1.6 kB WebP of
    6300x6300 took +606 MiB): refused above max_costly_pixels, before decoding; baseline RGB JPEG is not."""
    buf = io.BytesIO()
    Image.new(mode, (4000, 3001)).save(buf, format=fmt, **save)
    with pytest.raises(ImageRejected, match="decoded whole") as e:
        open_bounded(buf.getvalue(), ImageLimits(), min_side=36)
    assert e.value.status == 413
    assert open_bounded(buf.getvalue(), ImageLimits(max_costly_pixels=13_000_000), min_side=36).mode == "RGB"
    plain = io.BytesIO()
    Image.new("RGB", (4000, 3001)).save(plain, format="JPEG")
    assert open_bounded(plain.getvalue(), ImageLimits(), min_side=36).mode == "RGB"


def test_server_settings_are_one_typed_model_checked_where_they_enter(tmp_path):
    """cl_serve/serving/settings.py: the CLI, build_app/app_builder and reconfigure all validate with it."""
    from cl_serve.serving import settings as server_settings
    from tests.conftest import run_cli

    full = server_settings.validated({"canary_percent": 5, "image_formats": ["png", "jpeg"]})
    assert full["canary_percent"] == 5 and full["image_formats"] == ["PNG", "JPEG"]
    assert full["max_queued_requests"] == server_settings.default("max_queued_requests") == 64
    for bad, words in [({"canary_percent": 120}, "canary_percent"), ({"max_queue": 1}, "unknown server settings"),
                       ({"image_formats": ["PDF"]}, "unknown image formats"), ({"max_images": 0}, "max_images")]:
        with pytest.raises(ValueError, match=words):
            server_settings.validated(bad)
    r = run_cli("serve", "--store", str(tmp_path), "--canary", "120")  # refused before Ray starts
    assert r.returncode == 2 and "canary_percent" in r.stderr, r.stderr
    # The batch settings: one typed model too, for the CLI, build_app and app_builder's arguments.
    for flags, words in ((["--batch-wait-ms", "5000"], "batch_wait_ms"), (["--max-batch-size", "0"], "max_batch_size")):
        r = run_cli("serve", "--store", str(tmp_path), *flags)
        assert r.returncode == 2 and words in r.stderr, r.stderr
    from cl_serve.serving.app import app_builder, build_app

    with pytest.raises(ValueError, match="batch_wait_ms"):
        build_app(str(tmp_path), batch_wait_ms=-1)
    with pytest.raises(ValueError, match="batch_wait_ms"):
        app_builder({"store": str(tmp_path), "batch_wait_ms": 2000})  # a RayService's argument reaches the check
    # ONNX Runtime's thread settings: typed as well, from the flags and a RayService's arguments alike.
    r = run_cli("serve", "--store", str(tmp_path), "--intra-op-threads", "0")
    assert r.returncode == 2 and "intra_op_threads" in r.stderr, r.stderr
    with pytest.raises(ValueError, match="spinning"):
        app_builder({"store": str(tmp_path), "ort_spinning": "sometimes"})
