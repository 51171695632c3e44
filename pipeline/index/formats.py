"""Manifest formats and the small records both manifest readers share (no torch, no pandas)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import JobError

log = logging.getLogger(__name__)

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


def jsonl_object(path: Path, n: int, line: str) -> dict | None:
    """Line n of a jsonl manifest as an object; None for a blank line; JobError naming the line."""
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise JobError(f"{path} line {n}: not JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise JobError(f"{path} line {n}: expected a JSON object with a \"path\"")
    return obj


def warn_duplicates(where: str | Path, dropped: list[Duplicate] | tuple[Duplicate, ...], same_file: int) -> None:
    if dropped:
        shown = ", ".join(f"{d.key!r} (line {d.line}, first on line {d.first_line})" for d in dropped[:5])
        log.warning("%s: %d duplicate path(s) dropped: %s%s", where, len(dropped), shown,
                    " ..." if len(dropped) > 5 else "")
    if same_file:
        log.warning("%s: %d entries name a file already listed under another id or spelling", where, same_file)
