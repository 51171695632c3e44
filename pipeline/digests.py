"""SHA-256 of whole files, with a cache so multi-GB weight files are read once, not per start.

A checkpoint swapped in place must change the run's identity (a resume that silently mixes two
models' captions is the worst failure this tool can have), so every byte is hashed. Hashing a
5 GB checkpoint takes seconds, so the digest of a large file is remembered in the user cache
($XDG_CACHE_HOME or ~/.cache, then vlm-caption-pipeline/digests/), keyed by everything the
kernel changes when the file does: path, device, inode, size, mtime and ctime (nanoseconds).
ctime cannot be set by a user (`touch -d`, `cp -p` and rsync set mtime, and the kernel then sets
ctime to now), so a same-size edit that even restores the old mtime still misses the cache. As in
git's "racily clean" rule, a file changed in the last RACY_NS is hashed but not remembered: file
timestamps advance in clock ticks, and an edit within the tick of the hashed version would keep
its ctime.

The cache is an optimisation, never a source of truth: a missing, unreadable or stale entry
means hashing the file again, and an unwritable cache folder only costs the time.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

from pipeline.atomic import write_text_atomic

log = logging.getLogger(__name__)

CACHED_FROM = 8 << 20          # smaller files (configs, tokenizers) are hashed every time: milliseconds
RACY_NS = 2_000_000_000        # a file changed this recently is not remembered (see above)


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vlm-caption-pipeline" / "digests"


def hash_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _key(path: Path, st: os.stat_result) -> list:
    return [str(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def file_sha256(path: str | os.PathLike) -> str:
    """The hex SHA-256 of the file's bytes (from the cache when the file provably did not change)."""
    path = Path(os.path.realpath(path))
    st = path.stat()
    if st.st_size < CACHED_FROM:
        return hash_file(path)
    key = _key(path, st)
    entry = cache_dir() / (hashlib.sha256(json.dumps(key).encode()).hexdigest()[:40] + ".json")
    try:
        doc = json.loads(entry.read_text(encoding="utf-8"))
        if isinstance(doc, dict) and doc.get("key") == key and isinstance(doc.get("sha256"), str):
            return doc["sha256"]
    except (OSError, ValueError):
        pass
    digest = hash_file(path)
    if _key(path, path.stat()) != key or time.time_ns() - st.st_ctime_ns < RACY_NS:
        return digest                   # changed while being read, or too recently to tell: not remembered
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(entry, json.dumps({"key": key, "sha256": digest}))
    except OSError as e:
        log.debug("digest cache %s not written: %s", entry.parent, e)
    return digest
