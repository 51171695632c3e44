"""The one way this project writes a file that someone else may read: never half of it.

    write(tmp)  ->  fsync(tmp)  ->  rename(tmp, path)  ->  fsync(folder)

The temporary file is a hidden sibling named after the final file, this process and a random
tag (`.00042.parquet.<pid>-<hex>.tmp`), so concurrent writers never share one and the sweep in
pipeline/ledger.py can tell which shard a leftover belongs to. A SIGKILL or power loss at any
instant leaves the old file or the new one, and after the folder fsync the new name survives a
crash. Missing folders are never created here: a run dir that vanished is an error to report,
not something to recreate silently. Errors are OSError; callers translate them into their own
one-line messages.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Callable


def temp_name(path: Path) -> Path:
    """A hidden sibling unique to this writer (pid + random: threads and array tasks never collide)."""
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def fsync(path: Path) -> None:
    """Flush a file's data, or a folder's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], None], *, exclusive: bool = False) -> None:
    """write(tmp), then make it `path` durably. exclusive: create `path` only if it does not exist
    (link instead of rename; FileExistsError otherwise), so of several processes creating the same
    file at once exactly one wins. The temp file is removed on any failure."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        fsync(tmp)
        if exclusive:
            os.link(tmp, path)
        else:
            os.replace(tmp, path)
        fsync(path.parent)
    finally:
        try:
            tmp.unlink(missing_ok=True)     # gone after a rename; a leftover after a failure or a link
        except OSError:
            pass                            # (a read-only folder: keep the original error)


def write_text_atomic(path: str | os.PathLike, text: str, *, exclusive: bool = False) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), exclusive=exclusive)
