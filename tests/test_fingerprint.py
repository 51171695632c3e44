"""Run identity: the model files are identified by every byte, fast on the second start.

The adversarial pass swapped a checkpoint in place (same size, same first and last MiB, a
different middle): the old size + first/last-MiB identity accepted it and captions.json mixed
two models 20/20. These tests edit the middle of a weight-sized file and even restore its mtime
(as `cp -p` or `rsync -t` would); the digest cache must never hide such a change.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from pipeline import digests
from pipeline import fingerprint as fp

SIZE = digests.CACHED_FROM + (1 << 20)           # over the cache threshold, like any weight file


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vlm-caption-pipeline" / "digests"


@pytest.fixture
def hashed(monkeypatch):
    """Counts whole-file hash computations."""
    calls = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda p: calls.append(p) or real(p))
    return calls


def _edit_middle_keep_mtime(path, at: int) -> bytes:
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(1)
        f.seek(at)
        f.write(bytes([old[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    now = path.stat()
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (st.st_size, st.st_mtime_ns, st.st_ino)
    return path.read_bytes()


def test_a_same_size_edit_in_the_middle_changes_the_identity(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(digests, "RACY_NS", 0)           # remember at once (the file is seconds old)
    f = tmp_path / "model.safetensors"
    f.write_bytes(os.urandom(SIZE))
    before = fp.file_identity(f)
    assert list(cache.iterdir())                          # the digest was remembered
    data = _edit_middle_keep_mtime(f, SIZE // 2)
    after = fp.file_identity(f)
    assert after != before
    assert after == f"{SIZE}:sha256:{hashlib.sha256(data).hexdigest()[:32]}"


def test_the_cache_spares_the_second_read_and_only_that(tmp_path, cache, hashed, monkeypatch):
    monkeypatch.setattr(digests, "RACY_NS", 0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(SIZE))
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert digests.file_sha256(f) == want and len(hashed) == 1
    assert digests.file_sha256(f) == want and len(hashed) == 1              # from the cache
    for entry in cache.iterdir():                                           # a damaged entry: hashed again
        entry.write_text("{not json")
    assert digests.file_sha256(f) == want and len(hashed) == 2
    with open(f, "ab") as h:
        h.write(b"x")
    assert digests.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest() and len(hashed) == 3


def test_small_and_racy_files_are_never_remembered(tmp_path, cache, hashed):
    small = tmp_path / "config.json"
    small.write_text("{}")
    big = tmp_path / "fresh.safetensors"
    big.write_bytes(os.urandom(SIZE))                    # changed just now: inside RACY_NS
    for _ in range(2):
        digests.file_sha256(small)
        digests.file_sha256(big)
    assert len(hashed) == 4 and not cache.exists()


def test_an_unwritable_cache_costs_only_time(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))      # a file where the folder should be
    monkeypatch.setattr(digests, "RACY_NS", 0)
    f = tmp_path / "w.safetensors"
    f.write_bytes(os.urandom(SIZE))
    assert digests.file_sha256(f) == hashlib.sha256(f.read_bytes()).hexdigest()
