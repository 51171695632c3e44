"""`pipeline plan`: what caption with the same options would do, read from the run dir alone: the
counts of a partly committed run (with failed rows and a set-aside shard), each array task's
slice, --retry-failed; the same refusals as caption; and nothing changed in the run dir by
--overwrite (a new input is listed in a temporary folder)."""

from __future__ import annotations

import os

from pipeline.config import ArraySlice
from tests.caption_helpers import run_cli
from tests.synthetic_runs import commit_shards, start


def _run(tmp_path):
    """23 images in shards of 4 (6 shards); shards 0, 2, 3 committed, every 3rd image failed; shard
    3's marker then set aside (as a failed verification would)."""
    m = tmp_path / "m.txt"
    m.write_text("".join(f"img/{i}.jpg\n" for i in range(23)))
    led = start(tmp_path / "run", str(m), 4)
    commit_shards(led, [0, 2, 3], status_of=lambda r: "missing" if r.index % 3 == 0 else "ok")
    os.replace(led.marker_path(3), str(led.marker_path(3)) + ".bad")
    return m, tmp_path / "run", led


def plan(capsys, *args) -> tuple[int, str]:
    code = run_cli("plan", *args)
    return code, capsys.readouterr().out


def test_counts_slices_and_retries(tmp_path, capsys):
    m, out, led = _run(tmp_path)
    code, text = plan(capsys, "--input", m, "--out", out, "--shard-size", "4")
    assert code == 0, text
    assert "caption joins the run in its run.json" in text
    assert "23 images in 6 shard(s) of 4" in text
    # shards 0 and 2 done (8 rows; failed: 0, 3 / 9 -> 3 rows in 2 shards); 4 pending incl. set-aside 3
    assert "2 done (2 with failed rows: 3 images), 4 pending (15 images), 1 set aside to redo" in text
    assert "this run   4 shard(s) to caption, 15 images: 1, 3, 4, 5" in text
    code, text = plan(capsys, "--input", m, "--out", out, "--shard-size", "4", "--num-shards-total", "2",
                      "--shard-index", "0", "--retry-failed")
    assert "task 0 of 2 1 shard(s) to caption, 4 images: 4; --retry-failed: 2 shard(s), 3 failed rows" in text
    code, text = plan(capsys, "--input", m, "--out", out, "--shard-size", "4", "--num-shards-total", "2",
                      "--shard-index", "1")
    assert "task 1 of 2 3 shard(s) to caption, 11 images: 1, 3, 5" in text
    assert led.pending(ArraySlice(1, 2)) == [1, 3, 5]                              # the planner agrees


def test_refuses_what_caption_refuses_and_overwrite_changes_nothing(tmp_path, capsys, caplog):
    m, out, led = _run(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text("x.jpg\ny.jpg\n")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    code, text = plan(capsys, "--input", other, "--out", out, "--shard-size", "4")
    assert code == 2 and text == ""
    assert f"holds a different run: the run's input was {m}, now {other}; use --overwrite" in caplog.text
    code, text = plan(capsys, "--input", other, "--out", out, "--shard-size", "4", "--overwrite")
    assert code == 0 and "--overwrite: caption starts over (it was made from another input" in text
    assert "2 images in 1 shard(s) of 4" in text and "1 shard(s) to caption, 2 images" in text
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before       # nothing written
    code, _ = plan(capsys, "--input", m, "--out", out, "--shard-size", "5")
    assert code == 2 and "its shard size was 4, now 5" in caplog.text
    (out / "run.json").write_text("{")
    code, _ = plan(capsys, "--input", m, "--out", out, "--shard-size", "4")
    assert code == 2 and "run.json is damaged" in caplog.text
