"""End to end: the real `caption` job (tiny golden Bunny, CPU) over each new input kind, with
resume. The images are the same in every source, so a good image's caption must not depend on
where its bytes came from (local file, tar member, Parquet cell, URL); every hostile or failing
input is a row with its status; an array slice then the full run completes the run without
redoing the slice's shards; a re-run is a no-op.

jobs/caption.py still reads manifests with pipeline.manifest (the index is wired in by phase 2),
so these tests patch its read_manifest with tests/index_runs.py's index-backed stand-in."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import jobs.plan
from tests.caption_helpers import caption, captions, markers, rows
from tests.index_runs import indexed_reader
from tests.source_fixtures import HttpServer, bytes_parquet, good_shard, hostile_shard, image_bytes

OPTS = {"max_new_tokens": 4, "shard_size": 3, "dtype": "float32"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Captions of 8 images (seeds 0..7, the fixtures' images) read as local files: {seed: caption}."""
    root = tmp_path_factory.mktemp("reference")
    for i in range(8):
        (root / f"{i}.png").write_bytes(image_bytes(i))
    (root / "m.txt").write_text("".join(f"{i}.png\n" for i in range(8)))
    assert caption(manifest=root / "m.txt", out=root / "run", **OPTS) == 0
    got = captions(root / "run")
    return {i: got[f"{i}.png"] for i in range(8)}


def _run_with_resume(monkeypatch, given: str, out: Path, index_dir: Path, workers: int = 0) -> list[dict]:
    builds: list[str] = []
    monkeypatch.setattr(jobs.plan, "read_manifest", indexed_reader(index_dir, OPTS["shard_size"], builds=builds))
    assert caption(manifest=given, out=out, num_shards_total=2, shard_index=0, workers=workers, **OPTS) == 0
    first = markers(out)
    assert first and not (out / "captions.json").exists()
    assert caption(manifest=given, out=out, **OPTS) == 0           # resumes: only the other slice runs
    after = markers(out)
    assert {k: after[k] for k in first} == first                   # the slice's shards were not redone
    assert caption(manifest=given, out=out, **OPTS) == 0           # complete: nothing to do
    assert markers(out) == after
    assert builds == [given]                                       # the index was built once, then validated
    return rows(out)


def test_tar_shards_end_to_end(tmp_path, monkeypatch, reference):
    shards = tmp_path / "shards"
    shards.mkdir()
    good_shard(shards / "000000.tar", [f"s{i}" for i in range(3)], seed=0)    # images of seeds 0, 1, 2
    good = hostile_shard(shards / "000001.tar")                               # ok1 = seed 1, ok2 = seed 4
    out = _run_with_resume(monkeypatch, str(shards / "{000000..000002}.tar"), tmp_path / "run", tmp_path / "idx")
    by_key = {r["key"]: r for r in out}
    assert by_key["s0"]["caption"] == reference[0] and by_key["s2"]["caption"] == reference[2]
    assert by_key["ok1"]["caption"] == reference[1] and by_key["ok2"]["caption"] == reference[4]
    assert len(good) == 2
    assert {k: r["status"] for k, r in by_key.items() if r["status"] != "ok"} == {
        "../../etc/x": "unsafe_member", "/abs/y": "unsafe_member", "link": "unsafe_member", "hard": "unsafe_member",
        "fifo": "unsafe_member", "nojpg": "missing", "big": "too_large",
        str(shards / "000002.tar"): "missing"}                              # the pattern names a shard that is not there
    assert by_key["s1"]["txt"] == "alt text of s1" and json.loads(by_key["s1"]["json"])["key"] == "s1"
    assert by_key["s0"]["path"] == str(shards / "000000.tar") + "#s0.png"


def test_parquet_image_bytes_end_to_end(tmp_path, monkeypatch, reference):
    f = tmp_path / "part.parquet"
    imgs = bytes_parquet(f, 5, seed=0, nulls=(3,), empty=(4,), row_group_size=2)   # seeds 0..4
    # workers=1: the cells are read in a spawned preprocessing process, as in production
    out = _run_with_resume(monkeypatch, str(f), tmp_path / "run", tmp_path / "idx", workers=1)
    keys = list(imgs)
    by_key = {r["key"]: r for r in out}
    assert [by_key[keys[i]]["caption"] for i in range(3)] == [reference[i] for i in range(3)]
    assert (by_key[keys[3]]["status"], by_key[keys[4]]["status"]) == ("missing", "not_an_image")
    # img2dataset's own columns pass through (renamed where the pipeline writes a column of that name)
    assert [by_key[k]["manifest_caption"] for k in keys] == [f"caption {k}" for k in keys]
    assert [by_key[k]["manifest_width"] for k in keys] == list(range(5))
    assert by_key[keys[1]]["path"] == f"{f}#1"


@pytest.fixture
def http_server():
    srv = HttpServer({f"{i}.png": image_bytes(i) for i in range(8)}, slow_s=3.0)
    yield srv
    srv.close()


def test_url_manifest_end_to_end(tmp_path, monkeypatch, reference, http_server):
    from pipeline.sources.fetch import FetchOptions
    import stages.preprocess as pre

    # the run's fetch limits (phase 2 takes them from the config): short timeout, small cap
    monkeypatch.setattr(pre.Preprocessor.__init__, "__defaults__", (FetchOptions(timeout_s=0.5, retries=1,
                                                                                 backoff_s=0.01, max_bytes=1 << 20),))
    (tmp_path / "local.png").write_bytes(image_bytes(5))
    b = http_server.base
    lines = [f"{b}/0.png", f"{b}/redirect", f"{b}/missing.png", f"{b}/slow", f"{b}/html", f"{b}/big", "local.png",
             f"{b}/3.png"]
    (tmp_path / "urls.txt").write_text("\n".join(lines) + "\n")
    out = _run_with_resume(monkeypatch, str(tmp_path / "urls.txt"), tmp_path / "run", tmp_path / "idx")
    got = {r["key"]: (r["status"], r["caption"]) for r in out}
    assert got[f"{b}/0.png"] == ("ok", reference[0])
    assert got[f"{b}/redirect"] == ("ok", reference[0])                     # redirects to the first image
    assert got["local.png"] == ("ok", reference[5]) and got[f"{b}/3.png"] == ("ok", reference[3])
    assert {k: s for k, (s, _) in got.items() if s != "ok"} == {
        f"{b}/missing.png": "download_error", f"{b}/slow": "download_error", f"{b}/html": "not_an_image",
        f"{b}/big": "too_large"}
    assert captions(tmp_path / "run")[f"{b}/0.png"] == reference[0]
