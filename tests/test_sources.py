"""pipeline/sources: every locator kind opens the right bytes, and every hostile or failing input
is a SourceError with a status (a row), never a crash. Tar shards with hostile members, Parquet
with null-bytes rows, URLs served by a local HTTP server (404, timeout, redirect, HTML, oversize,
transient 503) and by an S3-compatible server (moto's server mode)."""

from __future__ import annotations

import tarfile

import pytest
from hypothesis import given, settings, strategies as st

from pipeline.sources import locator as L
from pipeline.sources.fetch import FetchOptions, read_bytes
from pipeline.sources.tar import scan_tar, split_name
from tests.source_fixtures import HttpServer, bytes_parquet, good_shard, hostile_shard, image_bytes, s3_server

FAST = FetchOptions(timeout_s=1.0, retries=2, backoff_s=0.01, max_bytes=1 << 20)


def status_of(where, opts=FAST) -> str:
    with pytest.raises(L.SourceError) as e:
        read_bytes(where, opts)
    assert str(e.value) and "\n" not in str(e.value)        # one line a row can carry
    return e.value.status


# -- locators ------------------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)


@settings(max_examples=150, derandomize=True)
@given(st.one_of(
    st.builds(L.TarLocator, text.map(lambda s: "/d/" + s), text, st.integers(0, 2**62), st.integers(0, 2**40)),
    st.builds(L.ParquetLocator, text.map(lambda s: "/d/" + s), text, st.integers(0, 2**31), st.integers(0, 2**31)),
    st.builds(L.RejectedLocator, text, text),
    st.builds(L.FileLocator, text.map(lambda s: "/" + s)),
    st.builds(L.UrlLocator, text.map(lambda s: "https://h/" + s))))
def test_locator_string_round_trip(loc):
    s = L.encode(loc)
    assert L.parse(s) == loc
    assert L.is_local(s) == isinstance(loc, L.FileLocator)


def test_plain_paths_stay_local_and_garbage_is_a_row():
    assert L.is_local("/data/a.jpg") and L.is_local("relative/a.jpg") and not L.is_local("s3://b/k.jpg")
    assert status_of("tar:file=%2Fx") == "unreadable"           # malformed locator: a row, not a crash


# -- local files -----------------------------------------------------------------------------------

def test_file_locator_reads_bytes_under_the_cap(tmp_path):
    data = image_bytes(0)
    (tmp_path / "a.png").write_bytes(data)
    assert read_bytes(str(tmp_path / "a.png"), FAST) == data
    assert status_of(str(tmp_path / "nope.png")) == "missing"
    assert status_of(str(tmp_path)) == "not_a_file"
    assert status_of(str(tmp_path / "a.png"), FetchOptions(max_bytes=len(data) - 1)) == "too_large"


# -- WebDataset tar shards -------------------------------------------------------------------------

def test_split_name_follows_webdataset():
    assert split_name("a/b/000123.jpg") == ("a/b/000123", "jpg")
    assert split_name("./k.seg.png") == ("k", "seg.png")
    assert split_name("dir.v2/k.json") == ("dir.v2/k", "json")
    assert split_name("noext") is None and split_name("d/.hidden.jpg") is None


def test_good_shard_lists_samples_with_side_files_and_reads_by_offset(tmp_path):
    imgs = good_shard(tmp_path / "000000.tar", ["000000000", "000000001", "000000002"])
    rows, digest = scan_tar(str(tmp_path / "000000.tar"), 1 << 20)
    assert [r.key for r in rows] == list(imgs)
    assert all(r.status is None for r in rows)
    assert rows[1].txt == "alt text of 000000001" and '"url"' in rows[1].json
    for r in rows:
        loc = L.TarLocator(str(tmp_path / "000000.tar"), r.member, r.offset, r.size)
        assert read_bytes(L.encode(loc), FAST) == imgs[r.key]
    assert scan_tar(str(tmp_path / "000000.tar"), 1 << 20)[1] == digest
    good_shard(tmp_path / "000000.tar", ["000000000", "000000001", "000000009"])
    assert scan_tar(str(tmp_path / "000000.tar"), 1 << 20)[1] != digest


def test_hostile_shard_members_become_rows_with_statuses(tmp_path):
    good = hostile_shard(tmp_path / "bad.tar")
    rows, _ = scan_tar(str(tmp_path / "bad.tar"), 1 << 20)
    got = {r.key: (r.status, r.message) for r in rows}
    assert {k: s for k, (s, _) in got.items()} == {
        "ok1": None, "../../etc/x": "unsafe_member", "/abs/y": "unsafe_member", "link": "unsafe_member",
        "hard": "unsafe_member", "fifo": "unsafe_member", "nojpg": "missing", "ok2": None, "big": "too_large"}
    assert "outside the shard" in got["../../etc/x"][1] and "symbolic link" in got["link"][1]
    assert "2147483648 bytes" in got["big"][1]
    by_key = {r.key: r for r in rows}
    for k, data in good.items():
        r = by_key[k]
        assert read_bytes(L.TarLocator(str(tmp_path / "bad.tar"), r.member, r.offset, r.size), FAST) == data
    # a 2 GB claim under a big cap is still refused: the shard ends first
    rows, _ = scan_tar(str(tmp_path / "bad.tar"), 4 << 30)
    assert {r.key: r.status for r in rows}["big"] == "truncated"


def test_corrupt_missing_and_compressed_shards_are_rows(tmp_path):
    good_shard(tmp_path / "a.tar", ["k0", "k1", "k2"])
    data = bytearray((tmp_path / "a.tar").read_bytes())
    second_header = 512 + 512 * -(-len(image_bytes(0)) // 512)       # after k0.png's header + data
    data[second_header:second_header + 100] = b"\x07" * 100            # garbage where a header should be
    (tmp_path / "broken.tar").write_bytes(bytes(data))
    rows, _ = scan_tar(str(tmp_path / "broken.tar"), 1 << 20)
    assert rows[0].key == "k0" and rows[0].status is None
    assert rows[-1].shard_row and rows[-1].status == "corrupt" and "cannot be listed" in rows[-1].message
    assert scan_tar(str(tmp_path / "none.tar"), 1 << 20)[0][0].status == "missing"
    with tarfile.open(tmp_path / "c.tar.gz", "w:gz") as tf:
        tf.add(tmp_path / "a.tar", "x.tar")
    rows, _ = scan_tar(str(tmp_path / "c.tar.gz"), 1 << 20)
    assert [(r.shard_row, r.status) for r in rows] == [(True, "corrupt")]


def test_tar_member_read_notices_a_shrunk_shard(tmp_path):
    good_shard(tmp_path / "a.tar", ["k0"])
    r = scan_tar(str(tmp_path / "a.tar"), 1 << 20)[0][0]
    loc = L.TarLocator(str(tmp_path / "a.tar"), r.member, r.offset, r.size)
    with open(tmp_path / "a.tar", "r+b") as f:
        f.truncate(r.offset + 10)
    assert status_of(loc) == "truncated"
    assert status_of(L.TarLocator(str(tmp_path / "gone.tar"), "x.png", 512, 10)) == "missing"
    assert status_of(L.encode(L.RejectedLocator("unsafe_member", "a link"))) == "unsafe_member"


# -- Parquet image bytes ---------------------------------------------------------------------------

def test_parquet_cells_null_empty_oversize_and_changed_file(tmp_path):
    f = tmp_path / "part.parquet"
    imgs = bytes_parquet(f, 6, nulls=(1,), empty=(2,), row_group_size=4)
    keys = list(imgs)
    loc = lambda rg, row: L.ParquetLocator(str(f), "jpg", rg, row)  # noqa: E731
    assert read_bytes(loc(0, 0), FAST) == imgs[keys[0]]
    assert read_bytes(loc(1, 1), FAST) == imgs[keys[5]]              # row group 1, row 1 = row 5
    assert status_of(loc(0, 1)) == "missing"                          # null bytes
    assert status_of(loc(0, 2)) == "not_an_image"                     # empty bytes
    assert status_of(loc(0, 0), FetchOptions(max_bytes=10)) == "too_large"
    assert status_of(loc(5, 0)) == "missing"                          # no such row group (file changed)
    assert status_of(loc(1, 7)) == "missing"
    assert status_of(L.ParquetLocator(str(tmp_path / "gone.parquet"), "jpg", 0, 0)) == "missing"


# -- URLs: a local HTTP server ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def http_server():
    srv = HttpServer({"ok.png": image_bytes(7)}, slow_s=4.0)
    yield srv
    srv.close()


def test_http_ok_and_redirect(http_server):
    data = image_bytes(7)
    assert read_bytes(f"{http_server.base}/ok.png", FAST) == data
    assert read_bytes(f"{http_server.base}/redirect", FAST) == data


@pytest.mark.parametrize("route,status,words", [
    ("/missing.png", "download_error", "not found"),
    ("/html", "not_an_image", "HTML"),
    ("/big", "too_large", "cap"),
    ("/loop", "download_error", "redirect"),
])
def test_http_failures_are_rows(http_server, route, status, words):
    with pytest.raises(L.SourceError) as e:
        read_bytes(http_server.base + route, FAST)
    assert e.value.status == status and words.lower() in str(e.value).lower()


def test_http_404_is_not_retried_but_503_is_with_a_bound(http_server):
    before = http_server.hits("/missing2.png")
    assert status_of(f"{http_server.base}/missing2.png") == "download_error"
    assert http_server.hits("/missing2.png") - before == 1
    before = http_server.hits("/always503")
    with pytest.raises(L.SourceError, match="after 3 tries"):
        read_bytes(f"{http_server.base}/always503", FAST)
    assert http_server.hits("/always503") - before == 3              # 1 + retries=2, then a row
    assert read_bytes(f"{http_server.base}/flaky", FAST) == image_bytes(7)   # 503, then the image


def test_http_timeout_is_bounded(http_server):
    import time

    t0 = time.monotonic()
    opts = FetchOptions(timeout_s=0.5, retries=1, backoff_s=0.01)
    with pytest.raises(L.SourceError) as e:
        read_bytes(f"{http_server.base}/slow", opts)
    assert e.value.status == "download_error" and "tries" in str(e.value)
    assert time.monotonic() - t0 < 3.5                # 2 attempts x 0.5 s (+ overhead), not the 4 s sleep


def test_file_urls(tmp_path):
    (tmp_path / "a.png").write_bytes(image_bytes(3))
    assert read_bytes((tmp_path / "a.png").as_uri(), FAST) == image_bytes(3)
    assert status_of((tmp_path / "nope.png").as_uri()) == "download_error"


# -- URLs: an S3-compatible server (moto) ------------------------------------------------------------

@pytest.fixture(scope="module")
def s3_options():
    with s3_server({"images/a/ok.png": image_bytes(11), "images/a/page.html": b"<html>no</html>",
                    "images/a/big.png": b"\x89PNG" + b"\0" * (2 << 20)}) as endpoint:
        yield {"s3": {"endpoint_url": endpoint, "key": "test", "secret": "test",
                      "client_kwargs": {"region_name": "us-east-1"}}}


def test_s3_urls(s3_options):
    opts = FetchOptions(timeout_s=5, retries=1, backoff_s=0.01, max_bytes=1 << 20, storage_options=s3_options)
    assert read_bytes("s3://images/a/ok.png", opts) == image_bytes(11)
    assert status_of("s3://images/a/missing.png", opts) == "download_error"
    assert status_of("s3://images/a/page.html", opts) == "not_an_image"
    assert status_of("s3://images/a/big.png", opts) == "too_large"
    assert status_of("s3://no-such-bucket/x.png", opts) == "download_error"
