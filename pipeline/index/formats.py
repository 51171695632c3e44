"""Manifest formats and the small records both manifest readers share (no torch, no pandas)."""

from __future__ import annotations

import functools
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    except (json.JSONDecodeError, RecursionError) as e:
        raise JobError(f"{path} line {n}: not JSON ({getattr(e, 'msg', 'nested too deeply')})") from None
    if not isinstance(obj, dict):
        raise JobError(f"{path} line {n}: expected a JSON object with a \"path\"")
    if "\\u" in line:
        _valid_unicode(obj, path, n)
    return obj


def _valid_unicode(obj: Any, path: Path, line: int) -> None:
    """JSON's \\uXXXX escapes can spell a lone UTF-16 surrogate, which is no character: such a
    string could be neither a file name to open nor text for the Parquet shards (UTF-8)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        bad = e.object[e.start:e.end].encode("unicode_escape").decode("ascii")
        raise JobError(f"{path} line {line}: {bad} is a lone surrogate escape, not a character "
                       "(the file was not written from valid Unicode text)") from None


def warn_duplicates(where: str | Path, dropped: list[Duplicate] | tuple[Duplicate, ...], same_file: int) -> None:
    if dropped:
        shown = ", ".join(f"{d.key!r} (line {d.line}, first on line {d.first_line})" for d in dropped[:5])
        log.warning("%s: %d duplicate path(s) dropped: %s%s", where, len(dropped), shown,
                    " ..." if len(dropped) > 5 else "")
    if same_file:
        log.warning("%s: %d entries name a file already listed under another id or spelling", where, same_file)
