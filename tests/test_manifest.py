"""Manifests: every format, comments, relative paths, duplicates, ids, passthrough columns, digest,
and `pipeline manifest` (folder scan + seeded sample)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.errors import JobError
from pipeline.manifest import read_manifest, sample, scan_images

ROOT = Path(__file__).resolve().parents[1]


def test_txt_comments_blank_lines_relative_and_absolute(tmp_path):
    (tmp_path / "sub").mkdir()
    m = tmp_path / "sub" / "list.txt"
    m.write_text("# a comment\n\n  a.jpg  \nimgs/b.png\r\n   # indented comment\n/abs/c.jpg\n", encoding="utf-8")
    man = read_manifest(m)
    assert man.format == "txt"
    assert man.keys == ("a.jpg", "imgs/b.png", "/abs/c.jpg")
    assert man.paths == man.keys
    refs = man.refs(0, 10)
    assert [r.resolved for r in refs] == [str(tmp_path / "sub" / "a.jpg"), str(tmp_path / "sub" / "imgs" / "b.png"),
                                          "/abs/c.jpg"]
    assert [r.index for r in refs] == [0, 1, 2] and all(r.extra == {} for r in refs)


def test_duplicate_paths_dropped_and_reported(tmp_path, caplog):
    m = tmp_path / "m.txt"
    m.write_text("a.jpg\nb.jpg\na.jpg\n./b.jpg\n")
    man = read_manifest(m)
    assert man.keys == ("a.jpg", "b.jpg", "./b.jpg")
    assert [(d.key, d.first_line, d.line) for d in man.dropped] == [("a.jpg", 1, 3)]
    assert man.same_file == 1                      # ./b.jpg is b.jpg spelled differently
    assert "1 duplicate path(s) dropped" in caplog.text


def test_csv_with_id_and_passthrough(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("id,path,split,note\nx1,a.jpg,train,hello\nx2,b.jpg,val,\"comma, inside\"\n", encoding="utf-8")
    man = read_manifest(m)
    assert man.keys == ("x1", "x2") and man.paths == ("a.jpg", "b.jpg")
    assert man.extra == {"split": ["train", "val"], "note": ["hello", "comma, inside"]}
    assert man.extra_types == {"split": pa.string(), "note": pa.string()}
    assert man.ref(1, 0).extra == {"split": "val", "note": "comma, inside"}


def test_tsv(tmp_path):
    m = tmp_path / "m.tsv"
    m.write_text("path\tlabel\na.jpg\tcat\nb.jpg\tdog\n")
    man = read_manifest(m)
    assert man.format == "tsv" and man.keys == ("a.jpg", "b.jpg") and man.extra == {"label": ["cat", "dog"]}


def test_jsonl_types_inferred_and_mixed_kept_as_json(tmp_path):
    m = tmp_path / "m.jsonl"
    lines = [{"path": "a.jpg", "n": 1, "meta": {"k": 1}}, {"path": "b.jpg", "n": 2, "meta": "text"}, {"path": "c.jpg"}]
    m.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    man = read_manifest(m)
    assert man.keys == ("a.jpg", "b.jpg", "c.jpg")
    assert man.extra_types["n"] == pa.int64() and man.extra["n"] == [1, 2, None]
    assert man.extra_types["meta"] == pa.string() and man.extra["meta"] == ['{"k": 1}', '"text"', None]


def test_jsonl_bad_line_names_the_line(tmp_path):
    m = tmp_path / "m.jsonl"
    m.write_text('{"path": "a.jpg"}\n{oops\n')
    with pytest.raises(JobError, match="line 2"):
        read_manifest(m)


def test_parquet_keeps_column_types(tmp_path):
    m = tmp_path / "m.parquet"
    pq.write_table(pa.table({"path": ["a.jpg", "b.jpg"], "id": [10, 20], "score": pa.array([0.5, 1.5], pa.float32())}), m)
    man = read_manifest(m)
    assert man.format == "parquet" and man.keys == ("10", "20")
    assert man.extra_types == {"score": pa.float32()} and man.extra == {"score": [0.5, 1.5]}


def test_duplicate_ids_and_missing_columns_are_errors(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("id,path\nx,a.jpg\nx,b.jpg\n")
    with pytest.raises(JobError, match="id 'x' already used on line 2"):
        read_manifest(m)
    m.write_text("file\na.jpg\n")
    with pytest.raises(JobError, match="'path' column"):
        read_manifest(m)
    e = tmp_path / "empty.txt"
    e.write_text("# nothing\n\n")
    with pytest.raises(JobError, match="lists no images"):
        read_manifest(e)
    with pytest.raises(JobError, match="does not exist"):
        read_manifest(tmp_path / "nope.txt")


def test_digest_stable_and_sensitive(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("x.jpg\ny.jpg\n")
    b.write_text("# other comments do not matter\nx.jpg\n\ny.jpg\n")
    assert read_manifest(a).digest == read_manifest(b).digest
    b.write_text("x.jpg\nz.jpg\n")
    assert read_manifest(a).digest != read_manifest(b).digest


def test_shards_cover_manifest_once(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("".join(f"{i}.jpg\n" for i in range(23)))
    man = read_manifest(m)
    assert man.n_shards(5) == 5
    keys = [r.key for s in range(5) for r in man.refs(s, 5)]
    assert keys == list(man.keys)
    assert [r.shard for r in man.refs(4, 5)] == [4, 4, 4]


def _tree(root: Path) -> None:
    for rel in ("a/1.jpg", "a/2.PNG", "b/c/3.webp", "b/notes.txt", "4.gif", "b/c/5.jpeg"):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def test_scan_and_sample(tmp_path):
    _tree(tmp_path)
    found = scan_images(tmp_path)
    assert found == ["4.gif", "a/1.jpg", "a/2.PNG", "b/c/3.webp", "b/c/5.jpeg"]
    s1, s2 = sample(found, 3, seed=0), sample(found, 3, seed=0)
    assert s1 == s2 and len(s1) == 3 and s1 == sorted(s1) and set(s1) <= set(found)
    assert any(sample(found, 3, seed=k) != s1 for k in range(1, 10))
    assert sample(found, None, 0) == found


def test_manifest_command_writes_relative_paths(tmp_path):
    images = tmp_path / "images"
    _tree(images)
    out = tmp_path / "lists" / "m.txt"
    r = subprocess.run([sys.executable, "-m", "cli", "manifest", str(images), "--sample", "3", "--seed", "0",
                        "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    man = read_manifest(out)
    assert len(man) == 3
    expected = sample(scan_images(images), 3, 0)
    assert [os.path.relpath(r.resolved, images) for r in man.refs(0, 3)] == expected
    assert all(p.startswith("../images/") for p in man.paths)
    assert out.read_text().startswith("# pipeline manifest")
