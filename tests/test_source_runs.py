"""End to end through the real command line (`pipeline caption --input ...`, tiny golden Bunny, CPU)
over every input kind: WebDataset tar shards (hostile members included), Parquet image bytes
(null and empty cells), URLs (a local HTTP server: 404, timeout, redirect, HTML, oversize; an
S3-compatible server: moto) and local files. The images are the same in every source, so a good
image's caption must not depend on where its bytes came from; every failing input is a row with
its status. Resume is the same for every kind: an array slice, then the whole run (the slice's
shards are not redone), then a no-op; the input is indexed once per run dir."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.caption_helpers import CKPT, captions, markers, rows, run_cli
from tests.source_fixtures import HttpServer, bytes_parquet, good_shard, hostile_shard, image_bytes, s3_server

ARGS = ("--model", CKPT, "--max-new-tokens", "4", "--shard-size", "3", "--dtype", "float32", "--quiet")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Captions of 12 images (the fixtures' seeds 0..11) read as local files: {seed: caption}."""
    root = tmp_path_factory.mktemp("reference")
    for i in range(12):
        (root / f"{i}.png").write_bytes(image_bytes(i))
    (root / "m.txt").write_text("".join(f"{i}.png\n" for i in range(12)))
    assert run_cli("caption", "--manifest", root / "m.txt", "--out", root / "run", "--workers", "0", *ARGS) == 0
    got = captions(root / "run")
    return {i: got[f"{i}.png"] for i in range(12)}


def indexed(caplog) -> int:
    return sum(r.getMessage().startswith("indexed ") for r in caplog.records)


def run_with_resume(caplog, given: str, out: Path, *extra: str, workers: int = 0) -> list[dict]:
    """A slice (task 0 of 2), the whole run, a no-op re-run; the input indexed once. The rows."""
    caplog.set_level(logging.INFO, logger="pipeline")
    args = ("caption", "--input", given, "--out", out, "--workers", str(workers), *ARGS, *extra)
    assert run_cli(*args, "--num-shards-total", "2", "--shard-index", "0") == 0
    first = markers(out)
    assert first and not (out / "captions.json").exists()
    assert run_cli(*args) == 0                                       # resumes: only the other slice runs
    after = markers(out)
    assert {k: after[k] for k in first} == first                   # the slice's shards were not redone
    assert run_cli(*args) == 0                                       # complete: nothing to do
    assert markers(out) == after and (out / "captions.json").exists()
    assert indexed(caplog) == 1                                     # built once, then validated
    return rows(out)


def test_tar_shards_end_to_end(tmp_path, caplog, reference):
    shards = tmp_path / "shards"
    shards.mkdir()
    good_shard(shards / "000000.tar", [f"s{i}" for i in range(3)], seed=0)    # images of seeds 0, 1, 2
    good = hostile_shard(shards / "000001.tar")                               # ok1 = seed 1, ok2 = seed 4
    out = run_with_resume(caplog, str(shards / "{000000..000002}.tar"), tmp_path / "run")
    by_key = {r["key"]: r for r in out}
    assert by_key["s0"]["caption"] == reference[0] and by_key["s2"]["caption"] == reference[2]
    assert by_key["ok1"]["caption"] == reference[1] and by_key["ok2"]["caption"] == reference[4]
    assert len(good) == 2
    assert {k: r["status"] for k, r in by_key.items() if r["status"] != "ok"} == {
        "../../etc/x": "unsafe_member", "/abs/y": "unsafe_member", "link": "unsafe_member", "hard": "unsafe_member",
        "fifo": "unsafe_member", "nojpg": "missing", "big": "too_large",
        str(shards / "000002.tar"): "missing"}                              # the pattern names a shard that is not there
    assert "2147483648" in by_key["big"]["error"] and "outside the shard" in by_key["../../etc/x"]["error"]
    # side files are passthrough columns, next to our caption
    assert by_key["s1"]["txt"] == "alt text of s1" and json.loads(by_key["s1"]["json"])["key"] == "s1"
    assert by_key["s0"]["path"] == str(shards / "000000.tar") + "#s0.png"
    assert captions(tmp_path / "run")[str(shards / "000000.tar") + "#s0.png"] == reference[0]


def test_a_list_of_tar_shards_is_the_same_input_kind(tmp_path, caplog, reference):
    good_shard(tmp_path / "a.tar", ["k0", "k1"], seed=0)
    good_shard(tmp_path / "b.tar", ["k2"], seed=5)                        # seed 5000 -> not in the reference
    (tmp_path / "shards.txt").write_text("a.tar\nb.tar\n")
    caplog.set_level(logging.INFO, logger="pipeline")
    assert run_cli("caption", "--input", tmp_path / "shards.txt", "--out", tmp_path / "run", "--workers", "0",
                   *ARGS) == 0
    by_key = {r["key"]: r for r in rows(tmp_path / "run")}
    assert [by_key[k]["caption"] for k in ("k0", "k1")] == [reference[0], reference[1]]
    assert by_key["k2"]["status"] == "ok" and by_key["k2"]["txt"] == "alt text of k2"


def test_parquet_image_bytes_end_to_end(tmp_path, caplog, reference):
    f = tmp_path / "part.parquet"
    imgs = bytes_parquet(f, 5, seed=0, nulls=(3,), empty=(4,), row_group_size=2)   # seeds 0..4
    # workers=1: the cells are read in a spawned preprocessing process, as in production
    out = run_with_resume(caplog, str(f), tmp_path / "run", workers=1)
    keys = list(imgs)
    by_key = {r["key"]: r for r in out}
    assert [by_key[keys[i]]["caption"] for i in range(3)] == [reference[i] for i in range(3)]
    assert (by_key[keys[3]]["status"], by_key[keys[4]]["status"]) == ("missing", "not_an_image")
    # img2dataset's own columns pass through (renamed where the pipeline writes a column of that name)
    assert [by_key[k]["manifest_caption"] for k in keys] == [f"caption {k}" for k in keys]
    assert [by_key[k]["manifest_width"] for k in keys] == list(range(5))
    assert by_key[keys[1]]["path"] == f"{f}#1"


def test_parquet_image_and_key_columns_are_options(tmp_path, caplog, reference):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"sample": ["x0", "x1"], "pixels": pa.array([image_bytes(0), image_bytes(1)], pa.binary()),
                             "jpg": pa.array([b"not this", b"nor this"], pa.binary())}), tmp_path / "p.parquet")
    base = ("caption", "--input", tmp_path / "p.parquet", "--workers", "0", *ARGS)
    assert run_cli(*base, "--out", tmp_path / "run") == 2                             # no 'key' column
    assert "no key column 'key'" in caplog.records[-1].getMessage()
    assert not (tmp_path / "run").exists()                                             # nothing left behind
    assert run_cli(*base, "--out", tmp_path / "run", "--key-column", "sample", "--image-column", "pixels") == 0
    assert {r["key"]: r["caption"] for r in rows(tmp_path / "run")} == {"x0": reference[0], "x1": reference[1]}
    # another image column is another input: the run dir refuses it, naming the option
    assert run_cli(*base, "--out", tmp_path / "run", "--key-column", "sample", "--image-column", "jpg") == 2
    assert "--image-column was 'pixels', now 'jpg'" in caplog.records[-1].getMessage()


@pytest.fixture
def http_server():
    srv = HttpServer({f"{i}.png": image_bytes(i) for i in range(12)}, slow_s=3.0)
    yield srv
    srv.close()


def test_url_manifest_end_to_end(tmp_path, caplog, reference, http_server):
    (tmp_path / "local.png").write_bytes(image_bytes(5))
    b = http_server.base
    lines = [f"{b}/0.png", f"{b}/redirect", f"{b}/missing.png", f"{b}/slow", f"{b}/html", f"{b}/big", "local.png",
             f"{b}/3.png", "not-there.png"]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    # the fetch limits are options: a short timeout, one retry, a 1 MiB cap (/big sends 3 MiB)
    out = run_with_resume(caplog, str(tmp_path / "urls.txt"), tmp_path / "run", "--fetch-timeout", "0.5",
                          "--fetch-retries", "1", "--max-image-bytes", str(1 << 20))
    got = {r["key"]: (r["status"], r["caption"]) for r in out}
    assert got[f"{b}/0.png"] == ("ok", reference[0])
    assert got[f"{b}/redirect"] == ("ok", reference[0])                     # redirects to the first image
    assert got["local.png"] == ("ok", reference[5]) and got[f"{b}/3.png"] == ("ok", reference[3])
    assert {k: s for k, (s, _) in got.items() if s != "ok"} == {
        f"{b}/missing.png": "download_error", f"{b}/slow": "download_error", f"{b}/html": "not_an_image",
        f"{b}/big": "too_large", "not-there.png": "missing"}
    assert http_server.hits("/slow") == 2                                   # 1 + --fetch-retries 1
    assert captions(tmp_path / "run")[f"{b}/0.png"] == reference[0]


def test_a_failed_download_is_retried_by_retry_failed(tmp_path, reference, http_server):
    """A URL that failed (server down) is a row; --retry-failed redoes it once the server is back,
    with the same resume rules as a local file."""
    b = http_server.base
    (tmp_path / "urls.txt").write_text(f"{b}/1.png\n{b}/later.png\n{b}/2.png\n")
    args = ("caption", "--input", tmp_path / "urls.txt", "--out", tmp_path / "run", "--workers", "0",
            "--fetch-retries", "0", *ARGS)
    assert run_cli(*args) == 0
    assert {r["key"]: r["status"] for r in rows(tmp_path / "run")}[f"{b}/later.png"] == "download_error"
    http_server.handler.routes["/later.png"] = lambda h: http_server.handler.routes["/4.png"](h)
    assert run_cli(*args) == 0                                               # a plain re-run keeps the row
    assert run_cli(*args, "--retry-failed") == 0
    got = {r["key"]: r["caption"] for r in rows(tmp_path / "run")}
    assert got == {f"{b}/1.png": reference[1], f"{b}/later.png": reference[4], f"{b}/2.png": reference[2]}
    assert json.loads((tmp_path / "run" / "shards" / "00000.done.json").read_text())["attempt"] == 1


@pytest.fixture
def s3_env(monkeypatch):
    """An S3-compatible server with two objects, reached as fsspec is configured in production:
    FSSPEC_S3_* and AWS_* environment variables (seen by the spawned preprocessing workers)."""
    with s3_server({"imgs/6.png": image_bytes(6), "imgs/page.png": b"<!DOCTYPE html><html>denied</html>"}) as endpoint:
        for k, v in {"FSSPEC_S3_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                     "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(k, v)
        yield


def test_s3_urls_end_to_end(tmp_path, reference, s3_env):
    (tmp_path / "s3.txt").write_text("s3://imgs/6.png\ns3://imgs/page.png\ns3://imgs/none.png\n")
    assert run_cli("caption", "--input", tmp_path / "s3.txt", "--out", tmp_path / "run", "--workers", "1",
                   "--fetch-retries", "0", *ARGS) == 0
    got = {r["key"]: (r["status"], r["caption"]) for r in rows(tmp_path / "run")}
    assert got == {"s3://imgs/6.png": ("ok", reference[6]), "s3://imgs/page.png": ("not_an_image", None),
                   "s3://imgs/none.png": ("download_error", None)}
