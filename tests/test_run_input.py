"""The run's input index (pipeline/run_input.py): built once per run dir, also when array tasks
start together (one builds under the lock, the others wait and find it); validated by every later
task without parsing the input again; a run dir refuses another input and says what changed."""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline import fingerprint as fp
from pipeline.config import ArraySlice
from pipeline.errors import JobError
from pipeline.index import InputOptions, resolve_input
from pipeline.ledger import Ledger
from pipeline.run_input import layout_of, open_index
from tests.caption_helpers import cli
from tests.source_fixtures import good_shard

FINGER = fp.make({"config.json": "1:sha256:aa"}, "bunny", "q", None, None, {}, "float32", {}, {})


def start_run(out: Path, given: str, shard_size: int = 2, options: InputOptions = InputOptions()) -> Ledger:
    """A run dir as `caption` leaves it after planning: the index, then run.json."""
    led = Ledger(out)
    idx = open_index(led, resolve_input(given, options), shard_size, overwrite=False)
    led.open(FINGER, layout_of(idx), {}, False, ArraySlice())
    return led


def refusal(out: Path, given: str, shard_size: int = 2, options: InputOptions = InputOptions()) -> str:
    with pytest.raises(JobError) as e:
        open_index(Ledger(out), resolve_input(given, options), shard_size, overwrite=False)
    msg = str(e.value)
    assert "\n" not in msg and f"{out} holds a different run: " in msg and "--overwrite" in msg
    return msg.split("holds a different run: ")[1].split("; use --overwrite")[0]


def test_refusals_name_what_changed(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("a.jpg\nb.jpg\nc.jpg\n")
    out = tmp_path / "run"
    start_run(out, str(m))
    before = (out / "index.parquet").stat().st_mtime_ns
    assert refusal(out, str(m), shard_size=3) == "its shard size was 2, now 3"
    assert refusal(out, str(m), options=InputOptions(max_bytes=1000)) == "--max-image-bytes was 67108864, now 1000"
    m.write_text("a.jpg\nb.jpg\nd.jpg\n")
    assert refusal(out, str(m)) == f"the manifest {m} changed since the run started (its bytes differ)"
    good_shard(tmp_path / "0.tar", ["k"])
    assert refusal(out, str(tmp_path / "{0..1}.tar")) == "the run's input was a txt manifest, now 2 tar shards"
    assert (out / "index.parquet").stat().st_mtime_ns == before          # a refusal builds and writes nothing
    # --overwrite takes the new input
    idx = open_index(Ledger(out), resolve_input(str(m)), 2, overwrite=True)
    assert [r.key for r in idx.refs(1)] == ["d.jpg"]


def test_refusals_name_the_changed_shard_or_list(tmp_path):
    for i in range(3):
        good_shard(tmp_path / f"{i}.tar", [f"k{i}a", f"k{i}b"], seed=i)
    out = tmp_path / "run"
    pattern = str(tmp_path / "{0..2}.tar")
    start_run(out, pattern)
    good_shard(tmp_path / "1.tar", ["k1a", "k1c"], seed=1)
    assert refusal(out, pattern) == f"{tmp_path / '1.tar'} changed since the run started"
    (tmp_path / "list.txt").write_text("0.tar\n1.tar\n")
    out2 = tmp_path / "run2"
    start_run(out2, str(tmp_path / "list.txt"))
    (tmp_path / "list.txt").write_text("0.tar\n1.tar\n2.tar\n")
    assert refusal(out2, str(tmp_path / "list.txt")) in (
        f"the manifest {tmp_path / 'list.txt'} changed since the run started (its bytes differ)",)


def test_touched_or_moved_input_with_the_same_bytes_is_the_same_run(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="pipeline")
    d = tmp_path / "a"
    d.mkdir()
    (d / "m.txt").write_text("x.jpg\ny.jpg\n")
    out = tmp_path / "run"
    led = start_run(out, str(d / "m.txt"))
    os.utime(d / "m.txt", ns=(1, 1))                                   # touched: same bytes, no rebuild
    idx = open_index(Ledger(out), resolve_input(str(d / "m.txt")), 2, overwrite=False)
    assert idx.identity == led.layout.input
    shutil.move(d, tmp_path / "b")                                     # moved with its images: rebuilt, same run
    idx = open_index(Ledger(out), resolve_input(str(tmp_path / "b" / "m.txt")), 2, overwrite=False)
    assert idx.identity == led.layout.input
    assert idx.refs(0)[0].resolved == str(tmp_path / "b" / "x.jpg")
    assert "out of date" in caplog.text


def test_later_tasks_never_parse_the_input(tmp_path, monkeypatch):
    m = tmp_path / "m.txt"
    m.write_text("".join(f"{i}.jpg\n" for i in range(50)))
    out = tmp_path / "run"
    start_run(out, str(m), shard_size=7)
    import pipeline.index.build as build
    import pipeline.index.parse as parse

    def boom(*a, **k):
        raise AssertionError("the input was parsed again")

    monkeypatch.setattr(parse, "text_lines", boom)
    monkeypatch.setattr(build, "read_txt", boom)
    for touch in (False, True):
        if touch:
            os.utime(m, ns=(5, 5))                                      # stat differs: the raw digest decides
        idx = open_index(Ledger(out), resolve_input(str(m)), 7, overwrite=False)
        assert [r.key for r in idx.refs(3)] == [f"{i}.jpg" for i in range(21, 28)]


def test_a_failed_first_build_leaves_no_run_dir(tmp_path):
    (tmp_path / "m.csv").write_text("path,id\na.jpg,1\nb.jpg,1\n")
    with pytest.raises(JobError, match="id '1' already used on line 2"):
        open_index(Ledger(tmp_path / "runs" / "r"), resolve_input(str(tmp_path / "m.csv")), 2, overwrite=False)
    assert not (tmp_path / "runs" / "r").exists()


def test_array_tasks_starting_together_build_the_index_once(tmp_path):
    """Four `pipeline plan` processes (the planning half of four array tasks) on one new run dir:
    one builds the index under the lock, the others wait for it and report the same plan."""
    m = tmp_path / "m.txt"
    m.write_text("".join(f"d{i // 1000}/{i:07d}.jpg\n" for i in range(300_000)))

    def task(i: int):
        return cli("plan", "--input", str(m), "--out", str(tmp_path / "run"), "--shard-size", "100",
                   "--num-shards-total", "4", "--shard-index", str(i))

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(task, range(4)))
    assert [r.returncode for r in results] == [0] * 4, [r.stderr for r in results]
    built = [r for r in results if "INFO pipeline.run_input: indexed " in r.stderr]
    assert len(built) == 1
    for i, r in enumerate(results):
        assert "300,000 images in 3,000 shard(s) of 100" in r.stdout
        assert f"task {i} of 4 750 shard(s) to caption, 75,000 images" in r.stdout
