"""Bounded image decoding, shared by the trainer (task folders) and the server (request bodies).

Hostile files cost little: the header is read first and the image is refused before any pixel is allocated when
its width, height, pixel count or aspect ratio is over the limits (a 140-byte PNG can declare 500000 x 1 pixels,
and resizing such a strip to the model's shorter side would allocate gigabytes); JPEGs are decoded at reduced
size (`Image.draft`, DCT scaling) when the model needs far fewer pixels, and any other image much larger than needed
is box-reduced before its mode conversion; truncated and corrupt files are refused.
Before Pillow sees a byte, the format is recognised from its signature and checked against an allow-list (by
default what a classifier's users send: JPEG, PNG, WebP; GIF and BMP on request), and a JPEG's segments up to its
frame header are walked with a bound on their count and on fill bytes: Pillow's own marker loop runs in Python, so
a file of millions of empty markers would otherwise cost seconds.
Every refusal is an `ImageRejected` with an HTTP-like status: 400 corrupt, 413 too large, 415 not an image.
"""
from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

Image.init()  # every plugin registered: Image.open(formats=["JPEG", "MPO"]) raises KeyError on a bad JPEG otherwise

ALLOWED_FORMATS = {"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "PPM", "MPO"}
DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"P6", "PPM"), (b"P5", "PPM"))
JPEG_MAX_SEGMENTS = 64  # segments before the frame header (real files: about 4 to 20)
JPEG_MAX_FILL = 64  # 0xFF fill bytes allowed between segments


def sniff_format(data: bytes) -> str | None:
    """The image format named by the file's signature (None: not one we know)."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return next((fmt for magic, fmt in _SIGNATURES if data.startswith(magic)), None)


def check_jpeg_segments(data: bytes | memoryview) -> None:
    """Walk a JPEG's marker segments up to its frame header (SOFn) with bounded work; raises ImageRejected."""
    pos, segments, fill = 2, 0, 0
    while True:
        if pos + 4 > len(data) or data[pos] != 0xFF:
            raise ImageRejected(400, "corrupt JPEG: no frame header where one was expected")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            fill += 1
            if fill > JPEG_MAX_FILL:
                raise ImageRejected(400, f"corrupt JPEG: more than {JPEG_MAX_FILL} fill bytes between segments")
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return  # SOFn: Pillow reads the size from here on
        if marker in (0xD8, 0xD9, 0xDA) or 0xD0 <= marker <= 0xD7 or marker == 0x01:
            raise ImageRejected(400, f"corrupt JPEG: marker 0x{marker:02X} before the frame header")
        segments += 1
        if segments > JPEG_MAX_SEGMENTS:
            raise ImageRejected(400, f"corrupt JPEG: more than {JPEG_MAX_SEGMENTS} segments before the frame header")
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        if length < 2:
            raise ImageRejected(400, "corrupt JPEG: segment length under 2")
        pos += 2 + length


class ImageRejected(ValueError):
    """An image that is refused; `status` is 400 (corrupt), 413 (too large) or 415 (not a supported image)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class ImageLimits(BaseModel):
    """What one image may declare before it is decoded."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_pixels: int = Field(40_000_000, gt=0, description="width x height, as declared by the header")
    max_side: int = Field(20_000, gt=0, description="largest width or height")
    max_aspect: float = Field(50.0, ge=1.0, description="longer side / shorter side")
    max_file_bytes: int = Field(200 * 1024 * 1024, gt=0, description="largest encoded file read from disk")
    max_costly_pixels: int = Field(12_000_000, gt=0, description=(
        "pixel limit for files whose decoder holds the whole image at many bytes per pixel however small the "
        "model's input: WebP (about 15 bytes per pixel measured) and progressive or CMYK JPEG (the DCT coefficients "
        "of every component); 12 M is a 4000x3000 photo"))
    formats: tuple[str, ...] = Field(DEFAULT_FORMATS, min_length=1, description=(
        f"image formats accepted, from {sorted(ALLOWED_FORMATS)}; the rest is refused before decoding (415)"))


def open_bounded(source: bytes | str | Path, limits: ImageLimits, min_side: int = 0,
                 pixel_budget: int | None = None) -> Image.Image:
    """Decode one image to RGB within `limits`; raises ImageRejected.

    `min_side`: the smallest shorter side the caller needs (JPEGs are decoded at the largest DCT reduction that
    keeps it). `pixel_budget`: the most pixels this decode may allocate (a request's remaining budget).
    """
    if isinstance(source, bytes):
        if not source:
            raise ImageRejected(400, "empty image")
        fp = io.BytesIO(source)
    else:
        try:
            with open(source, "rb") as f:
                fp = io.BytesIO(f.read(limits.max_file_bytes + 1))
        except OSError as e:
            raise ImageRejected(400, f"unreadable file: {e.strerror or e}") from None
        if len(fp.getbuffer()) > limits.max_file_bytes:
            raise ImageRejected(413, f"file is over {limits.max_file_bytes} bytes")
        if not len(fp.getbuffer()):
            raise ImageRejected(400, "empty file")
    with fp.getbuffer() as buf:  # read in place: no copy of the file
        fmt = sniff_format(bytes(buf[:16]))
        if fmt not in limits.formats:
            raise ImageRejected(415, f"not an accepted image type ({fmt or 'unknown signature'}); accepted: "
                                     f"{', '.join(limits.formats)}")
        if fmt == "JPEG":
            check_jpeg_segments(buf)
    try:
        im = Image.open(fp, formats=[fmt] if fmt != "JPEG" else ["JPEG", "MPO"])
    except Image.DecompressionBombError:
        raise ImageRejected(413, f"image has too many pixels (limit {limits.max_pixels})") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, KeyError, IndexError, TypeError):
        raise ImageRejected(415, "not a decodable image (supported: JPEG, PNG, WebP, BMP, GIF, TIFF)") from None
    try:
        return _decode_opened(im, limits, min_side, pixel_budget)
    finally:
        im.close()


_REDUCIBLE = {"RGB": "RGB", "L": "L", "RGBA": "RGB", "LA": "L"}  # mode -> the colour channels convert("RGB") keeps


def _reduce_to_rgb(im: Image.Image, factor: int) -> Image.Image:
    """convert("RGB") then reduce(factor), without a full-size RGB copy. Alpha is dropped first, as convert does
    (Pillow's reduce of an RGBA image would weight colours by alpha): the colour channels are reduced one at a time."""
    keep = _REDUCIBLE[im.mode]
    if keep == im.mode:
        small = im.reduce(factor)
    elif keep == "L":
        small = im.getchannel("L").reduce(factor)
    else:
        small = Image.merge("RGB", [im.getchannel(c).reduce(factor) for c in "RGB"])
    return small if small.mode == "RGB" else small.convert("RGB")


# EXIF orientation (tag 0x0112) -> the transpose that shows the picture upright, as cameras and phones mean it
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}


def exif_orientation(im: Image.Image) -> int:
    """The EXIF orientation an opened image declares (1, upright, when it has none or it cannot be read)."""
    try:
        value = im.getexif().get(0x0112, 1)
        return int(value) if int(value) in _ORIENTATION else 1
    except Exception:  # a malformed EXIF block is ignored, as viewers do
        return 1


def upright(rgb: Image.Image, orientation: int) -> Image.Image:
    """The decoded image turned as its EXIF orientation says (applied after decoding and reduction: a transpose of
    the small image). Training, evaluation and serving all decode through open_bounded, so they agree."""
    op = _ORIENTATION.get(orientation)
    return rgb if op is None else rgb.transpose(op)


def _decode_opened(im: Image.Image, limits: ImageLimits, min_side: int, pixel_budget: int | None) -> Image.Image:
    if im.format not in ALLOWED_FORMATS:
        raise ImageRejected(415, f"unsupported image type {im.format}")
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageRejected(400, "image has no pixels")
    if w * h > limits.max_pixels:
        raise ImageRejected(413, f"image is {w}x{h} = {w * h} pixels; the limit is {limits.max_pixels}")
    if max(w, h) > limits.max_side:
        raise ImageRejected(413, f"image is {w}x{h}; the largest side allowed is {limits.max_side}")
    if max(w, h) / min(w, h) > limits.max_aspect:
        raise ImageRejected(413, f"image is {w}x{h}: aspect ratio {max(w, h) / min(w, h):.0f}:1 is over the "
                                 f"limit of {limits.max_aspect:g}:1")
    costly = im.format == "WEBP" or (im.format in ("JPEG", "MPO") and (
        im.mode == "CMYK" or im.info.get("progressive") or im.info.get("progression")))
    if costly and w * h > limits.max_costly_pixels:
        kind = "WebP" if im.format == "WEBP" else "progressive or CMYK JPEG"
        raise ImageRejected(413, f"{kind} image of {w}x{h} = {w * h} pixels: such files are decoded whole; the limit "
                                 f"for them is {limits.max_costly_pixels} pixels")
    orientation = exif_orientation(im)
    if im.format in ("JPEG", "MPO") and min_side > 0:
        im.draft("RGB", (min_side, min_side))  # decode at 1/2, 1/4 or 1/8 size when that still covers min_side
    dw, dh = im.size
    if pixel_budget is not None and dw * dh > pixel_budget:
        raise ImageRejected(413, "the images of this request decode to more pixels than allowed; "
                                 "send fewer or smaller images")
    try:
        im.load()
        # A decoded image far larger than the model needs is box-reduced by an integer factor (keeping at least twice
        # min_side, as Pillow's own reducing_gap does) before any mode conversion: the conversion then copies a
        # small image instead of a second full-size one (an RGBA PNG or WebP of 40 Mpx: 160 MB instead of 280 MB).
        factor = min(im.size) // (2 * min_side) if min_side > 0 else 1
        rgb = _reduce_to_rgb(im, factor) if factor >= 2 and im.mode in _REDUCIBLE else im.convert("RGB")
        return upright(rgb, orientation)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageRejected(400, f"truncated or corrupt image: {e}") from None
    except MemoryError:
        raise ImageRejected(413, "image is too large to decode") from None
