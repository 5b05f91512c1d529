"""Image files built in memory for the hostile-input benchmark and its corpus: a PNG that only declares its size
(a decompression bomb's header) and a blank image of any format, size and mode."""
from __future__ import annotations

import io
import struct
import zlib


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width x height grey pixels but carries almost no data: a decompression bomb's header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


def encoded_image(fmt: str, size: tuple[int, int], mode: str = "L") -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format=fmt)
    return buf.getvalue()
