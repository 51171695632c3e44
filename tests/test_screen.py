"""The error path's screen (pipeline/screen.py) == the preprocessing stage's opener on generated
folders of files: every ref the screen turns into a row is one the opener refuses with the same
status and message; every ref it lets through is one the opener would have to try (a non-empty
regular file, a URL or a tar/Parquet locator). Batches larger than a stat chunk run on threads;
the order of rows and refs is the input's."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from pipeline.config import ImageLimits
from pipeline.records import ImageRef
from pipeline.screen import screen
from pipeline.sources import locator as L
from pipeline.sources.local import STAT_CHUNK
from stages.preprocess import ImageError, open_untrusted
from tests.source_fixtures import image_bytes

KINDS = ("image", "missing", "empty", "folder", "fifo", "link_to_image", "dangling_link", "link_loop", "under_a_file",
         "nul", "not_an_image", "rejected", "url", "tar")


def _make(root, i: int, kind: str) -> str:
    p = root / f"f{i}.png"
    if kind == "image":
        p.write_bytes(image_bytes(i % 3))
    elif kind == "empty":
        p.write_bytes(b"")
    elif kind == "folder":
        p.mkdir()
    elif kind == "fifo":
        os.mkfifo(p)
    elif kind == "link_to_image":
        (root / f"t{i}.png").write_bytes(image_bytes(1))
        p.symlink_to(root / f"t{i}.png")
    elif kind == "dangling_link":
        p.symlink_to(root / "nowhere.png")
    elif kind == "link_loop":
        p.symlink_to(p)
    elif kind == "under_a_file":
        (root / f"plain{i}").write_bytes(b"x")
        return str(root / f"plain{i}" / "a.png")
    elif kind == "nul":
        return str(root / f"bad\0{i}.png")
    elif kind == "not_an_image":
        p.write_bytes(b"hello")
    elif kind == "rejected":
        return L.encode(L.RejectedLocator("unsafe_member", f"member '../{i}.jpg' names a path outside the shard"))
    elif kind == "url":
        return f"http://127.0.0.1:9/{i}.png"
    elif kind == "tar":
        return L.encode(L.TarLocator(str(root / "none.tar"), f"{i}.jpg", 512, 10))
    return str(p)


def _check(kinds: list[str], root) -> None:
    refs = tuple(ImageRef(f"k{i}", f"p{i}", _make(root, i, k), 0, i) for i, k in enumerate(kinds))
    failed, rest = screen(refs)
    assert sorted([f.ref.index for f in failed] + [r.index for r in rest]) == list(range(len(refs)))
    assert [f.ref.index for f in failed] == sorted(f.ref.index for f in failed)      # input order
    for f in failed:
        with pytest.raises(ImageError) as e:
            open_untrusted(f.ref.resolved, ImageLimits())
        assert (f.status, f.error, f.stage) == (e.value.status, str(e.value), "preprocess"), kinds[f.ref.index]
    for r in rest:
        k = kinds[r.index]
        assert k in ("image", "link_to_image", "not_an_image", "url", "tar"), k


@settings(max_examples=40, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kinds=st.lists(st.sampled_from(KINDS), max_size=STAT_CHUNK * 3))
def test_screen_gives_the_openers_rows(kinds, tmp_path_factory):
    _check(kinds, tmp_path_factory.mktemp("screen"))


@pytest.mark.parametrize("threads", [False, True])
def test_screen_on_a_large_batch_keeps_order(tmp_path, monkeypatch, threads):
    """A large batch, stat'ed here (a fast disk) or on threads (as for a slow network filesystem)."""
    import pipeline.sources.local as local

    monkeypatch.setattr(local, "SLOW_STAT_S", 0.0 if threads else 1.0)
    kinds = [KINDS[i % len(KINDS)] for i in range(STAT_CHUNK * 5 + 7)]
    _check(kinds, tmp_path)
    assert (local._pool is not None) or not threads
