"""Hostile image files made in the tests (nothing is stored): headers that declare huge sizes,
and progressive JPEGs with a scan repeated many times."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w x h but carries almost no data: what a decompression bomb looks like
    to the opener (the pixels are never decoded, so the size alone must stop it)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def jpeg(mode: str, size: tuple[int, int], progressive: bool, seed: int = 0) -> bytes:
    """Random pixels of `size` (w, h) in mode RGB or L, as a baseline or progressive JPEG."""
    rng = np.random.default_rng(seed)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode).save(buf, "JPEG", progressive=progressive,
                                                                           quality=85)
    return buf.getvalue()


def repeat_last_scan(data: bytes, k: int) -> bytes:
    """The last scan (marker, header, entropy-coded data up to EOI) k more times: the attack's
    shape. Pillow writes no thumbnail, so the last FFDA is the last scan's marker."""
    last = data.rfind(b"\xff\xda")
    assert last > 0 and data.endswith(b"\xff\xd9")
    return data[:-2] + data[last:-2] * k + b"\xff\xd9"


def scan_bomb() -> bytes:
    """A 1000x1000 progressive JPEG whose last scan is repeated 4,000 times (the adversarial
    pass's file: under the pixel cap, tens of seconds to decode)."""
    return repeat_last_scan(jpeg("L", (1000, 1000), True, seed=2), 4000)
