"""Open the bytes of any locator under one set of limits; every failure is a SourceError."""

from __future__ import annotations

import os
import stat

from pipeline.config import FetchOptions
from pipeline.sources import locator as L
from pipeline.sources.parquet_bytes import read_cell
from pipeline.sources.tar import read_member
from pipeline.sources.url import read_url

_HTML = (b"<!doctype html", b"<html", b"<head", b"<?xml")

__all__ = ["FetchOptions", "read_bytes"]        # FetchOptions is declared with the run's options


def _read_file(path: str, max_bytes: int) -> bytes:
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise L.SourceError("not_a_file", "not a regular file")
            if st.st_size > max_bytes:
                raise L.SourceError("too_large", f"{st.st_size} bytes, over the cap of {max_bytes}")
            return f.read(max_bytes + 1)
    except FileNotFoundError:
        raise L.SourceError("missing", f"no such file: {path}") from None
    except IsADirectoryError:
        raise L.SourceError("not_a_file", "a folder, not a file") from None
    except PermissionError as e:
        raise L.SourceError("unreadable", f"permission denied: {e.filename}") from None
    except OSError as e:
        raise L.SourceError("unreadable", f"cannot read: {e.strerror or e}") from None


def read_bytes(where: str | L.Locator, opts: FetchOptions = FetchOptions()) -> bytes:
    """The encoded image bytes a locator (or its string form) names, or SourceError."""
    try:
        loc = L.parse(where) if isinstance(where, str) else where
    except ValueError as e:
        raise L.SourceError("unreadable", str(e)) from None
    if isinstance(loc, L.RejectedLocator):
        raise L.SourceError(loc.status, loc.message)
    if isinstance(loc, L.FileLocator):
        data = _read_file(loc.path, opts.max_bytes)
    elif isinstance(loc, L.TarLocator):
        data = read_member(loc, opts.max_bytes)
    elif isinstance(loc, L.ParquetLocator):
        data = read_cell(loc, opts.max_bytes)
    else:
        data = read_url(loc.url, opts)
    if not data:
        raise L.SourceError("not_an_image", "empty (0 bytes)")
    if data[:256].lstrip().lower().startswith(_HTML):
        raise L.SourceError("not_an_image", "an HTML/XML page, not an image (an error or login page?)")
    return data
