"""Counting the scans of a JPEG before it is decoded.

A progressive JPEG is decoded scan by scan, each scan passing over the whole image, so decode
time grows with scans x pixels. Encoders write about 10 scans (libjpeg's progression; mozjpeg a
few more), but nothing in the format stops a file from repeating one scan thousands of times: a
469 KB file under the pixel cap with one scan repeated 4,000 times held a worker for 32 s.
libjpeg-turbo has a scan limit for exactly this (TJPARAM_SCANLIMIT, djpeg -maxscans); Pillow does
not expose it, so the opener counts the scans itself and refuses a file with too many.

The count walks the marker segments of the first image only (an EXIF thumbnail inside APP1 and
the later pictures of an MPO file are skipped), in C-speed `find` steps over an mmap.
"""

from __future__ import annotations

import io
import mmap
import re

MAX_SCANS = 100          # 10x what encoders write; a real photo never comes close

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
# A marker: 0xFF then a byte that is not a stuffed zero (0xFF00 is a data byte inside a scan),
# a restart marker (RST0-7 sit inside scan data) or another 0xFF (fill).
_MARKER = re.compile(rb"\xff[\x01-\xcf\xd8-\xfe]")


def count_scans(f, limit: int = MAX_SCANS) -> int:
    """Start-of-scan markers in the JPEG of file object `f` (a file: mapped, position untouched;
    an in-memory buffer: read as is); counting stops past `limit`. A malformed structure ends the
    count early: the decoder then reports the damage."""
    if isinstance(f, io.BytesIO):
        return _count(f.getbuffer(), limit)
    with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _count(buf, limit)


def _count(buf, limit: int) -> int:
    if len(buf) < 4 or buf[0] != 0xFF or buf[1] != _SOI:
        return 0
    n, pos = 0, 2
    while n <= limit:
        m = _MARKER.search(buf, pos)              # skips a scan's entropy-coded data at C speed
        if m is None:
            break
        pos = m.start()
        marker = buf[pos + 1]
        if marker == _EOI:
            break
        if marker in (0x01, _SOI) or pos + 3 >= len(buf):     # TEM / a stray SOI: no length field
            pos += 2
            continue
        n += marker == _SOS
        pos += 2 + ((buf[pos + 2] << 8) | buf[pos + 3])      # the segment (an APP1 thumbnail is skipped whole)
    return n
