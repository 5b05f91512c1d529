"""A generated corpus of hostile and edge-case requests for POST /classify, several hundred of them, seeded.

Families (each case: a name, httpx request kwargs, and the statuses it may get):
  formats     every format x colour mode x size Pillow can write (allowed ones must classify, the rest get 415)
  truncated   each valid file cut at several points (a 4xx, or a 200 where the cut left a decodable image)
  corrupted   seeded byte flips in valid files (any 200 or 4xx; never a 5xx)
  headers     PNG headers declaring every size around the pixel, side and aspect limits (413 or 400/415)
  json        wrong types, unknown keys, nesting depths, arrays of every length, bad base64, top_k variants
  multipart   missing or wrong boundaries, wrong field names, many parts, empty and oversized parts
  framing     odd content types and encodings

`benchmarks.hostile` runs the whole corpus against a live server (status, time and replica memory per case) and
tests/test_server.py runs a seeded sample of it. Nothing here may answer 5xx.
"""
from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass, field

from PIL import Image

from benchmarks.image_builders import png_header_only

OK = frozenset({200})
CLIENT_ERROR = frozenset(range(400, 500))
ANY_NOT_5XX = OK | CLIENT_ERROR


@dataclass
class Case:
    family: str
    name: str
    kwargs: dict
    allowed: frozenset = field(default=CLIENT_ERROR)


def _encode(fmt: str, size: tuple[int, int], mode: str, seed: int, **save) -> bytes | None:
    rng = random.Random(seed)
    try:
        img = Image.new(mode, size)
        if size[0] * size[1] <= 1 << 16:  # some content, so the encoders do real work
            img.putdata([rng.randrange(256) if len(mode) == 1 or mode in ("P", "I;16") else
                         tuple(rng.randrange(256) for _ in mode) for _ in range(size[0] * size[1])])
        buf = io.BytesIO()
        img.save(buf, format=fmt, **save)
        return buf.getvalue()
    except (OSError, ValueError, KeyError, TypeError):
        return None  # this format cannot hold this mode


def _files(blobs: list[bytes], field_name: str = "file") -> dict:
    return {"files": [(field_name, (f"{i}.img", b, "application/octet-stream")) for i, b in enumerate(blobs)]}


def _raw(body, ctype: str | None = "application/json") -> dict:
    return {"content": body, "headers": {"content-type": ctype} if ctype else {}}


def image_cases(seed: int) -> list[Case]:
    out: list[Case] = []
    accepted = {"PNG", "JPEG", "WEBP"}
    sizes = [(1, 1), (33, 7), (64, 64), (640, 480), (3000, 2)]
    formats = {"PNG": ["1", "L", "P", "RGB", "RGBA", "I;16", "LA"], "JPEG": ["L", "RGB", "CMYK"],
               "WEBP": ["RGB", "RGBA"], "GIF": ["L", "P"], "BMP": ["1", "L", "RGB"], "TIFF": ["L", "RGB", "CMYK"],
               "ICO": ["RGBA"], "PPM": ["RGB"]}
    valid: list[tuple[str, bytes]] = []
    for fmt, modes in formats.items():
        for mode in modes:
            for size in sizes:
                blob = _encode(fmt, size, mode, seed)
                if blob is None:
                    continue
                name = f"{fmt} {mode} {size[0]}x{size[1]}"
                # a format off the allow-list is refused; an allowed one classifies unless its aspect ratio is over
                # the limit (3000x2)
                allowed = (OK if size != (3000, 2) else CLIENT_ERROR) if fmt in accepted else CLIENT_ERROR
                out.append(Case("formats", name, _files([blob]), allowed))
                if fmt in accepted:
                    valid.append((name, blob))
    for extra, blob in [("JPEG progressive RGB 640x480", _encode("JPEG", (640, 480), "RGB", seed, progressive=True)),
                        ("WEBP lossless RGB 640x480", _encode("WEBP", (640, 480), "RGB", seed, lossless=True)),
                        ("PNG interlaced RGB 640x480", _encode("PNG", (640, 480), "RGB", seed, optimize=True))]:
        if blob is not None:
            out.append(Case("formats", extra, _files([blob]), OK))
            valid.append((extra, blob))
    rng = random.Random(seed)
    for name, blob in valid:
        for frac in (0.1, 0.5, 0.9, 0.99):
            out.append(Case("truncated", f"{name} cut at {frac:.0%}", _files([blob[:max(1, int(len(blob) * frac))]]),
                            ANY_NOT_5XX))
        for k in range(2):
            b = bytearray(blob)
            for _ in range(1 + k * 7):
                b[rng.randrange(len(b))] = rng.randrange(256)
            out.append(Case("corrupted", f"{name} with {1 + k * 7} flipped bytes #{k}", _files([bytes(b)]),
                            ANY_NOT_5XX))
    for w, h in [(40_000_001, 1), (1, 40_000_001), (6325, 6325), (6400, 6400), (20_001, 2), (2, 20_001),
                 (20_000, 1999), (1999, 20_000), (10_000, 10_000), (2**31 - 1, 2**31 - 1), (0, 10), (10, 0)]:
        out.append(Case("headers", f"PNG header {w}x{h}", _files([png_header_only(w, h)])))
    return out


def json_cases(good: bytes, max_images: int = 64) -> list[Case]:
    b64 = base64.b64encode(good).decode()
    out = [Case("json", "valid", {"json": {"images": [b64]}}, OK),
           Case("json", f"{max_images} images", {"json": {"images": [b64] * max_images}}, OK),
           Case("json", f"{max_images + 1} images", {"json": {"images": [b64] * (max_images + 1)}})]
    for n in (1_000, 10_000, 100_000, 500_000):
        out.append(Case("json", f"array of {n} integers", _raw(b'{"images": [' + b",".join([b"1"] * n) + b"]}")))
        out.append(Case("json", f"array of {n} empty strings", _raw(b'{"images": [' + b",".join([b'""'] * n) + b"]}")))
    for depth in (3, 10, 1_000, 100_000):
        out.append(Case("json", f"nested {depth} deep", _raw(b'{"images": ' + b"[" * depth + b"]" * depth + b"}")))
        out.append(Case("json", f"objects nested {depth} deep", _raw(b'{"a":' * depth + b"1" + b"}" * depth)))
    for name, body in {
        "images a string": {"images": b64}, "images an object": {"images": {"a": b64}}, "images null": {"images": None},
        "image an integer": {"images": [7]}, "image null": {"images": [None]}, "image empty": {"images": [""]},
        "image bad base64": {"images": ["***"]}, "image base64 of text": {"images": [base64.b64encode(b"hi").decode()]},
        "image base64 with spaces": {"images": [" ".join(b64[i:i + 4] for i in range(0, 40, 4))]},
        "unknown key": {"images": [b64], "x": 1}, "no images key": {"top_k": 1}, "empty object": {},
        "top_k string": {"images": [b64], "top_k": "3"}, "top_k float": {"images": [b64], "top_k": 2.5},
        "top_k huge": {"images": [b64], "top_k": 10 ** 40}, "top_k negative": {"images": [b64], "top_k": -1},
        "top_k null": {"images": [b64], "top_k": None}, "top_k list": {"images": [b64], "top_k": [1]},
    }.items():
        ok = name in ("top_k null",)
        out.append(Case("json", name, {"json": body}, OK if ok else CLIENT_ERROR))
    for name, raw in {"not JSON": b"{images", "JSON array": b"[]", "JSON number": b"1", "NaN top_k":
                      b'{"images": ["%s"], "top_k": NaN}' % b64.encode(), "trailing garbage": b'{"images": []} x',
                      "BOM": b"\xef\xbb\xbf{}", "UTF-16": '{"images": []}'.encode("utf-16"), "empty body": b"",
                      "duplicate keys": b'{"images": [], "images": ["%s"]}' % b64.encode()}.items():
        out.append(Case("json", name, _raw(raw), ANY_NOT_5XX if name == "duplicate keys" else CLIENT_ERROR))
    return out


def multipart_cases(good: bytes, max_images: int = 64) -> list[Case]:
    def body(parts: list[tuple[str, bytes]], boundary: bytes = b"b0und") -> bytes:
        out = b""
        for name, data in parts:
            out += (b"--" + boundary + b"\r\nContent-Disposition: form-data; name=\"" + name.encode()
                    + b"\"; filename=\"x.png\"\r\nContent-Type: image/png\r\n\r\n" + data + b"\r\n")
        return out + b"--" + boundary + b"--\r\n"

    mp = "multipart/form-data; boundary=b0und"
    return [
        Case("multipart", "valid", _files([good]), OK),
        Case("multipart", f"{max_images} files", _files([good] * max_images), OK),
        Case("multipart", f"{max_images + 1} files", _files([good] * (max_images + 1))),
        Case("multipart", "500 files", _files([good] * 500)),
        Case("multipart", "wrong field name", _files([good], "image")),
        Case("multipart", "empty file", _files([b""])),
        Case("multipart", "no parts", _raw(b"--b0und--\r\n", mp)),
        Case("multipart", "no closing boundary", _raw(body([("file", good)])[:-10], mp)),
        Case("multipart", "boundary mismatch", _raw(body([("file", good)]), "multipart/form-data; boundary=other")),
        Case("multipart", "boundary missing", _raw(body([("file", good)]), "multipart/form-data")),
        Case("multipart", "2000 empty parts", _raw(body([("x", b"")] * 2000), mp)),
        Case("multipart", "header of 100 kB", _raw(b"--b0und\r\nContent-Disposition: form-data; name=\"file\"; x=\""
                                                   + b"a" * 100_000 + b"\"\r\n\r\n" + good + b"\r\n--b0und--\r\n", mp)),
        Case("multipart", "path traversal file name", {"files": [("file", ("../../etc/passwd", good, "image/png"))]},
             OK),
        Case("multipart", "top_k field text", {**_files([good]), "data": {"top_k": "three"}}),
        Case("multipart", "top_k field empty", {**_files([good]), "data": {"top_k": ""}}, ANY_NOT_5XX),
        Case("multipart", "file as text field", {"data": {"file": "not a file"}}),
    ]


def framing_cases(good: bytes) -> list[Case]:
    return [Case("framing", f"content type {ct!r}", _raw(good, ct)) for ct in
            ["image/png", "text/plain", "application/x-www-form-urlencoded", "application/json; charset=latin-1",
             "multipart/mixed; boundary=x", "", None]] + [
        Case("framing", "gzip content encoding", {"content": b"\x1f\x8b" + b"\x00" * 20,
                                                  "headers": {"content-type": "application/json",
                                                              "content-encoding": "gzip"}}),
        Case("framing", "GET /classify", {"method": "GET"}),
        Case("framing", "PUT /classify", {"method": "PUT", "json": {"images": []}})]


def corpus(good: bytes, seed: int = 0) -> list[Case]:
    """Every case, in a stable order."""
    return image_cases(seed) + json_cases(good) + multipart_cases(good) + framing_cases(good)


def sample(good: bytes, n: int, seed: int = 0) -> list[Case]:
    """A seeded sample of `n` cases, at least one of each family (the bounded version for the test suite)."""
    cases = corpus(good, seed)
    rng = random.Random(seed)
    by_family: dict[str, list[Case]] = {}
    for c in cases:
        by_family.setdefault(c.family, []).append(c)
    chosen = [rng.choice(v) for v in by_family.values()]
    rest = [c for c in cases if c not in chosen]
    return chosen + rng.sample(rest, max(0, min(n - len(chosen), len(rest))))
