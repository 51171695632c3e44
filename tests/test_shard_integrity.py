"""Committed shards are checked wherever they are read (captions.json, export, --retry-failed):
the marker's SHA-256 of the data file, and the file's own `shard` / `index` columns. A shard that
fails is set aside (its marker renamed to .bad) and redone; nothing crashes, nothing is mixed.

The adversarial pass found: a shard corrupted in place (same size) crashed every re-run and
`export`; a marker with "file": null gave tracebacks; a marker pointing at a copy of another
shard was accepted (4 rows lost, 4 duplicated). The resume scan itself still reads only names
and sizes (39,000 shards at 10M images), so these are caught where the data is read anyway.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from caption_helpers import (CKPT, CORPUS_ARGS, caption, captions, cli, error_lines, markers, reference_run, rows,
                             run_with_a_late_image)

CORPUS_OPTS = {"max_new_tokens": 4, "shard_size": 4, "dtype": "float32"}       # = CORPUS_ARGS


def _copy_of_reference(tmp_path: Path) -> tuple[Path, Path, Path]:
    manifest, ref = reference_run()
    out = tmp_path / "run"
    shutil.copytree(ref, out)
    return manifest, ref, out


def _flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _marker(out: Path, shard: int) -> dict:
    return json.loads((out / "shards" / f"{shard:05d}.done.json").read_text())


def _write_marker(out: Path, shard: int, doc: dict) -> None:
    (out / "shards" / f"{shard:05d}.done.json").write_text(json.dumps(doc))


def test_export_sets_a_corrupted_shard_aside_and_the_rerun_redoes_only_it(tmp_path):
    manifest, ref, out = _copy_of_reference(tmp_path)
    before = markers(out)
    _flip_middle(out / "shards" / "00002.parquet")                  # same size: the resume scan cannot see it
    r = cli("export", str(out), "--format", "jsonl", "-o", str(tmp_path / "all.jsonl"))
    assert r.returncode == 1 and len(error_lines(r.stderr)) == 2 and "Traceback" not in r.stderr
    assert "shard 2: 00002.parquet changed after it was committed" in r.stderr
    assert "shard(s) 2 do not match their done markers and were set aside" in error_lines(r.stderr)[-1]
    assert not (tmp_path / "all.jsonl").exists()
    assert (out / "shards" / "00002.done.json.bad").exists()
    r = cli("status", str(out))
    assert r.returncode == 0 and "pending    4 images in 1 shard(s): 2" in r.stdout
    assert "set aside  1 shard(s) whose data no longer matched its done marker: 2" in r.stdout
    r = cli("caption", "--manifest", str(manifest), "--model", str(CKPT), "--out", str(out), "--workers", "0",
            *CORPUS_ARGS)
    assert r.returncode == 0, r.stderr
    assert "this process: 1 shard(s) to do" in r.stderr
    after = markers(out)
    assert {k: v for k, v in after.items() if k != "00002.done.json"} == \
        {k: v for k, v in before.items() if k != "00002.done.json"}
    assert rows(out) == rows(ref) and captions(out) == captions(ref)


def test_building_captions_json_verifies_and_repairs_in_the_same_run(tmp_path):
    """Three kinds of bad shard at once; the same command sets them aside and redoes them."""
    manifest, ref, out = _copy_of_reference(tmp_path)
    (out / "captions.json").unlink()                                 # as if killed before writing it
    shards = out / "shards"
    _flip_middle(shards / "00005.parquet")                           # corrupted in place
    shutil.copyfile(shards / "00003.parquet", shards / "00004.parquet")       # a copy of another shard...
    copy = (shards / "00004.parquet").read_bytes()
    _write_marker(out, 4, {**_marker(out, 4), "bytes": len(copy),            # ...with a marker that matches it
                           "sha256": hashlib.sha256(copy).hexdigest()})
    _write_marker(out, 7, {**_marker(out, 7), "file": None})                 # a marker naming no file
    assert caption(manifest=manifest, out=out, **CORPUS_OPTS) == 0
    assert sorted(p.name for p in shards.glob("*.bad")) == ["00004.done.json.bad", "00005.done.json.bad"]
    got = rows(out)
    assert got == rows(ref) and len({r["key"] for r in got}) == len(got) == 44       # none lost, none twice
    assert captions(out) == captions(ref)


def test_retry_failed_redoes_a_corrupted_shard_whole(tmp_path):
    manifest, out, _ = run_with_a_late_image(tmp_path, ("a", "late"))
    _flip_middle(out / "shards" / "00000.parquet")
    assert caption(manifest=manifest, out=out, shard_size=2, retry_failed=True) == 0
    m = _marker(out, 0)
    assert (m["attempt"], m["processed"], m["status"]) == (0, 2, {"ok": 2})   # redone whole, not merged
    assert (out / "shards" / "00000.done.json.bad").exists()
    assert {r["key"]: r["status"] for r in rows(out)} == {"imgs/a.png": "ok", "imgs/late.png": "ok"}


def test_partial_export_never_writes_captions_json(tmp_path):
    manifest, ref, out = _copy_of_reference(tmp_path)
    (out / "captions.json").unlink()
    for p in (out / "shards").glob("00003.*"):
        p.unlink()
    r = cli("export", str(out), "--format", "json", "--partial")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out / "captions.partial.json") and not (out / "captions.json").exists()
    assert len(json.loads((out / "captions.partial.json").read_text())) == 40
    r = cli("export", str(out), "--format", "json", "--partial", "-o", str(out / "captions.json"))
    assert r.returncode == 2 and "means a complete run" in error_lines(r.stderr)[0]
    assert not (out / "captions.json").exists()
