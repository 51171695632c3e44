"""Local image files: what opening one will fail with, decided once for the preprocessing stage's
opener and for the screen that keeps unopenable files out of the worker pool (pipeline/screen.py).

Both must give a file the same status and message, whichever of them meets it first, so the rules
live here: no such file -> `missing`; a folder, FIFO or device -> `not_a_file`; 0 bytes ->
`not_an_image`; no permission or another OS error -> `unreadable`.
"""

from __future__ import annotations

import os
import stat
import time
from concurrent.futures import ThreadPoolExecutor

from pipeline.sources.locator import SourceError

STAT_THREADS = 16        # stat() waits on the file server on NFS/Lustre: overlap the round trips
STAT_CHUNK = 64          # paths per thread task (one task per path costs more than a local stat)
SLOW_STAT_S = 50e-6      # a local stat() takes 1-5 us, a network round trip 100 us or more

_pool: ThreadPoolExecutor | None = None


def open_error(e: OSError | ValueError, path: str) -> SourceError:
    """The row for an os.open()/os.stat() of `path` that raised `e` (ValueError: a NUL in the path)."""
    if isinstance(e, (FileNotFoundError, NotADirectoryError)):
        return SourceError("missing", f"no such file: {path}")
    if isinstance(e, PermissionError):
        return SourceError("unreadable", f"permission denied: {e.filename}")
    if isinstance(e, IsADirectoryError):
        return SourceError("not_a_file", "a folder, not a file")
    return SourceError("unreadable", f"cannot open: {e}")


def file_error(st: os.stat_result) -> SourceError | None:
    """The row for a file with this stat, or None if it may be an image (a non-empty regular file)."""
    if not stat.S_ISREG(st.st_mode):
        return SourceError("not_a_file", "not a regular file")
    if st.st_size == 0:
        return SourceError("not_an_image", "empty file")
    return None


def stat_error(path: str) -> SourceError | None:
    """What opening `path` would fail with, judged from stat() (which follows links like open does);
    None for a file the opener must try (it may still be unreadable or not an image)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError) as e:
        return open_error(e, path)
    return file_error(st)


def _chunk(paths: list[str]) -> list[SourceError | None]:
    return [stat_error(p) for p in paths]


def stat_errors(paths: list[str]) -> list[SourceError | None]:
    """stat_error of every path, in order. The first chunk is stat'ed here; if that was slow (a
    network filesystem), the rest go in chunks to a few threads so the round trips overlap; on a
    local disk threads would only add their overhead."""
    global _pool
    t0 = time.perf_counter()
    head = _chunk(paths[:STAT_CHUNK])
    rest = paths[STAT_CHUNK:]
    if not rest or (time.perf_counter() - t0) / len(head) < SLOW_STAT_S:
        return head + _chunk(rest)
    if _pool is None:
        _pool = ThreadPoolExecutor(STAT_THREADS, thread_name_prefix="stat")
    chunks = [rest[i:i + STAT_CHUNK] for i in range(0, len(rest), STAT_CHUNK)]
    return head + [e for part in _pool.map(_chunk, chunks) for e in part]
