"""The identity of an index's input: digests of raw bytes (plus the parse options) and file stats.

A manifest's identity is a sha256 of its raw bytes (~1 s for 450 MB), never of parsed entries.
A tar shard's is a digest of its listing (headers and side files: the shard is not read whole);
a Parquet file's is a sha256 of its footer, which records every column chunk's offset and size.
Stats (size, mtime) are only a fast path: when they match, the index is taken as current; when
they do not, the digest is recomputed and decides.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import asdict
from typing import Any

from pipeline.index.inputs import InputSpec

VERSION = 1


def raw_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(8 << 20):
            h.update(block)
    return "sha256:" + h.hexdigest()


def parquet_footer_digest(path: str) -> str:
    """sha256 of a Parquet file's footer (metadata + length + magic); ValueError if it is not Parquet."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        if size < 12:
            raise ValueError("too short for Parquet")
        f.seek(size - 8)
        tail = f.read(8)
        if tail[4:] != b"PAR1":
            raise ValueError("no Parquet footer")
        n = struct.unpack("<I", tail[:4])[0]
        if n + 8 > size:
            raise ValueError("corrupt Parquet footer length")
        f.seek(size - 8 - n)
        return "sha256:" + hashlib.sha256(f.read(n + 8)).hexdigest()


def stat_of(path: str) -> dict[str, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def options_record(spec: InputSpec) -> dict[str, Any]:
    """What, besides the bytes, decides the index's content."""
    return {"version": VERSION, "kind": spec.kind, "format": spec.format, "options": asdict(spec.options)}


def combine(spec: InputSpec, parts: list[str]) -> str:
    """One digest from the options and the per-input digests, in order."""
    h = hashlib.sha256(json.dumps(options_record(spec), sort_keys=True).encode())
    for p in parts:
        h.update(b"\n" + p.encode("utf-8", "surrogateescape"))
    return "sha256:" + h.hexdigest()


def list_digest(spec: InputSpec) -> str:
    """The identity of the list of inputs itself: the manifest's raw bytes, or the pattern text."""
    return raw_digest(spec.manifest) if spec.manifest else "pattern:" + spec.given
