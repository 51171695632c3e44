"""Manifest formats and the small records both manifest readers share (no torch, no pandas)."""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import JobError

FORMATS = {".txt": "txt", ".lst": "txt", ".list": "txt", ".csv": "csv", ".tsv": "tsv", ".tab": "tsv",
           ".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet", ".pq": "parquet"}


@functools.cache
def py_whitespace() -> str:
    """What str.strip() removes: the index strips txt lines exactly as the Python reader does."""
    return "".join(chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace())


@dataclass(frozen=True)
class Duplicate:
    key: str
    first_line: int
    line: int


def format_of(path: Path) -> str:
    """The manifest format a file's suffix names (txt for unknown suffixes)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise JobError(f"{path}: .json manifests are not supported; use .jsonl (one object a line)")
    return FORMATS.get(suffix, "txt")
