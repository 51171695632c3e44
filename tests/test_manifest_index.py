"""The manifest index (pipeline/index): agrees with pipeline/manifest.py on generated manifests of
every format (keys, paths, passthrough values and types, dropped duplicates, same-file count,
errors); shard-aligned row groups; refs per shard equal the reader's; cheap validation; the new
input kinds; and no torch import."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from unittest import mock

import pipeline.index.build as index_build
from pipeline.errors import JobError
from pipeline.index import InputOptions, ManifestIndex, build_index, check_index, resolve_input
from pipeline.manifest import read_manifest
from tests.source_fixtures import bytes_parquet, good_shard, hostile_shard

ROOT = Path(__file__).resolve().parents[1]

# -- generated manifests ------------------------------------------------------------------------------

_seg = st.sampled_from(["a", "b", "img", "x y", "é", "日本", ".", "..", "", "c.jpg", "#h", "sub"])
_path = st.one_of(
    st.lists(_seg, min_size=1, max_size=3).map("/".join).map(lambda p: p + ".jpg"),
    st.sampled_from(["a.jpg", "./a.jpg", "a//b.jpg", "sub/../a.jpg", "/abs/a.jpg", "/abs/./a.jpg", "b.png/",
                     " a.jpg", "a.jpg ", "\u3000c.jpg", "#not-comment-in-csv.jpg"]))
_scalar = st.one_of(st.none(), st.integers(-5, 5), st.floats(allow_nan=False, allow_infinity=False, width=32),
                    st.text(max_size=4), st.booleans())
_json_value = st.one_of(_scalar, st.lists(st.integers(0, 3), max_size=2), st.fixed_dictionaries({"k": st.integers(0, 2)}))


@st.composite
def txt_manifest(draw) -> bytes:
    lines = draw(st.lists(st.one_of(_path, st.sampled_from(["", "   ", "# comment", "  # indented", "\t"])),
                          min_size=0, max_size=25))
    pad = draw(st.lists(st.sampled_from(["", " ", "\t", "\u3000", "\x1c"]), min_size=len(lines), max_size=len(lines)))
    sep = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    body = sep.join(p + line + p[::-1] for p, line in zip(pad, lines)) + draw(st.sampled_from(["", sep]))
    return (b"\xef\xbb\xbf" if draw(st.booleans()) else b"") + body.encode()


@st.composite
def delimited_manifest(draw, delimiter: str) -> bytes:
    extra = draw(st.lists(st.sampled_from(["label", "note", "split"]), unique=True, max_size=2))
    with_id = draw(st.booleans())
    header = (["id"] if with_id else []) + ["path"] + extra
    draw(st.randoms()).shuffle(header)
    n = draw(st.integers(0, 20))
    ids = draw(st.lists(st.sampled_from(["x1", "x2", "x3", "y", "z", "7"]), min_size=n, max_size=n))
    out = io.StringIO()
    w = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    w.writerow(header)
    for i in range(n):
        row = {"id": ids[i], "path": draw(_path), **{k: draw(st.text(st.characters(blacklist_characters="\r\n\x00",
                                                                                   blacklist_categories=("Cs",)),
                                                                      max_size=5)) for k in extra}}
        w.writerow([row[h] for h in header])
    return out.getvalue().encode()


@st.composite
def jsonl_manifest(draw) -> bytes:
    n = draw(st.integers(0, 20))
    keys = draw(st.lists(st.sampled_from(["meta", "score", "tag"]), unique=True, max_size=3))
    with_id = draw(st.sampled_from(["none", "all", "int"]))
    lines = []
    for i in range(n):
        obj = {"path": draw(_path)}
        if with_id == "all":
            obj["id"] = draw(st.sampled_from(["a", "b", "c", "d", "e", "f", "g"]))
        elif with_id == "int":
            obj["id"] = draw(st.integers(0, 40))
        for k in keys:
            if draw(st.booleans()):
                obj[k] = draw(_json_value)
        lines.append(json.dumps(obj, ensure_ascii=draw(st.booleans())))
        if draw(st.integers(0, 5)) == 0:
            lines.append("")
    return ("\n".join(lines) + "\n").encode()


@st.composite
def parquet_manifest(draw) -> pa.Table:
    n = draw(st.integers(0, 20))
    cols = {"path": draw(st.lists(_path, min_size=n, max_size=n))}
    kind = draw(st.sampled_from(["none", "int", "str"]))
    if kind == "int":
        cols["id"] = draw(st.lists(st.integers(0, 100), min_size=n, max_size=n))
    elif kind == "str":
        cols["id"] = draw(st.lists(st.sampled_from(list("abcdefghij")), min_size=n, max_size=n))
    cols["score"] = pa.array(draw(st.lists(st.none() | st.floats(0, 1, width=32), min_size=n, max_size=n)), pa.float32())
    cols["n"] = draw(st.lists(st.none() | st.integers(-3, 3), min_size=n, max_size=n))
    return pa.table(cols)


def _write(folder: Path, fmt: str, content) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    m = folder / f"m.{fmt}"
    if fmt == "parquet":
        pq.write_table(content, m, row_group_size=7)
    else:
        m.write_bytes(content)
    return m


def _agree(m: Path, shard_size: int, out: Path) -> None:
    """The index of m and read_manifest(m) agree on everything, or both refuse m."""
    try:
        man = read_manifest(m)
    except JobError:
        man = None
    try:
        info = build_index(resolve_input(str(m)), out, shard_size)
    except JobError:
        assert man is None, "the index refused a manifest the reader accepts"
        return
    assert man is not None, "the index accepted a manifest the reader refuses"
    assert info.n_rows == len(man)
    assert info.dropped == man.dropped and info.same_file == man.same_file
    assert info.extra_types == man.extra_types
    idx = ManifestIndex(out)
    sizes = [len(man.shard_indices(s, shard_size)) for s in range(man.n_shards(shard_size))]
    g = idx.group_shards
    assert [idx.pf.metadata.row_group(i).num_rows for i in range(idx.pf.num_row_groups)] == [
        sum(sizes[i:i + g]) for i in range(0, len(sizes), g)]                   # row groups of whole shards
    for s in range(man.n_shards(shard_size)):
        want = [(r.key, r.path, r.resolved, r.shard, r.index, r.extra) for r in man.refs(s, shard_size)]
        got = [(r.key, r.path, r.resolved, r.shard, r.index, r.extra) for r in idx.refs(s)]
        assert got == want


FORMATS = {"txt": txt_manifest(), "csv": delimited_manifest(","), "tsv": delimited_manifest("\t"),
           "jsonl": jsonl_manifest(), "parquet": parquet_manifest()}


def _property(fmt: str, examples: int, derandomize: bool, tmp_path_factory):
    @settings(max_examples=examples, derandomize=derandomize, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
    @given(content=FORMATS[fmt], shard_size=st.integers(1, 6), group_rows=st.integers(1, 14))
    def check(content, shard_size, group_rows):
        d = tmp_path_factory.mktemp(fmt)
        with mock.patch.object(index_build, "GROUP_ROWS", group_rows):     # row groups of 1..14 shards
            _agree(_write(d / "lists", fmt, content), shard_size, d / "run" / "index.parquet")

    check()


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_index_agrees_with_the_reader(fmt, tmp_path_factory):
    _property(fmt, 40, True, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_index_agrees_with_the_reader_many(fmt, tmp_path_factory):
    _property(fmt, 600, False, tmp_path_factory)


# -- hand-picked cases ------------------------------------------------------------------------------

def test_duplicates_ids_and_errors_name_lines(tmp_path):
    m = tmp_path / "m.csv"
    m.write_text("id,path\nx,a.jpg\ny,b.jpg\nx,c.jpg\n")
    with pytest.raises(JobError, match="line 4: id 'x' already used on line 2"):
        build_index(resolve_input(str(m)), tmp_path / "i.parquet", 2)
    assert not list(tmp_path.glob(".*tmp*")) and not (tmp_path / "i.parquet").exists()    # nothing half-written
    m.write_text("path,id\na.jpg,\n")
    with pytest.raises(JobError, match="line 2: empty id"):
        build_index(resolve_input(str(m)), tmp_path / "i.parquet", 2)
    m.write_text("path,x\na.jpg,1,2\n")
    with pytest.raises(JobError, match="line 2: more fields than header columns"):
        build_index(resolve_input(str(m)), tmp_path / "i.parquet", 2)
    t = tmp_path / "t.txt"
    t.write_bytes(b"a.jpg\n\xff\xfe.jpg\n")
    with pytest.raises(JobError, match=r"not UTF-8 text \(invalid start byte at byte 6\)"):
        build_index(resolve_input(str(t)), tmp_path / "i.parquet", 2)


def test_large_txt_crosses_blocks_and_drops_duplicates(tmp_path, monkeypatch):
    import pipeline.index.parse as parse

    monkeypatch.setattr(parse, "BLOCK", 1000)        # many blocks, lines and \r\n split across them
    monkeypatch.setattr(index_build, "GROUP_ROWS", 64 * 5)     # row groups of 5 shards of 64
    lines = [f"d{i % 7}/img{i:05d}.jpg" for i in range(3000)] + ["d0/img00000.jpg", "d1/img00001.jpg"]
    m = tmp_path / "m.txt"
    m.write_bytes("\r\n".join(lines).encode() + b"\r\n")
    _agree(m, 64, tmp_path / "i.parquet")
    info = build_index(resolve_input(str(m)), tmp_path / "i2.parquet", 64)
    assert [(d.key, d.first_line, d.line) for d in info.dropped] == [("d0/img00000.jpg", 1, 3001),
                                                                    ("d1/img00001.jpg", 2, 3002)]
    idx = ManifestIndex(tmp_path / "i2.parquet")
    assert info.n_rows == 3000 and idx.n_shards == 47 and idx.pf.num_row_groups == 10
    assert [r.index for r in idx.refs(46)] == list(range(46 * 64, 3000))       # the last shard, short


def test_check_index_is_cheap_and_exact(tmp_path):
    m = tmp_path / "m.txt"
    m.write_text("a.jpg\nb.jpg\n")
    spec = resolve_input(str(m))
    out = tmp_path / "run" / "index.parquet"
    build_index(spec, out, 1)
    assert check_index(out, spec, 1) is None
    os.utime(m, ns=(1, 1))                                        # touched, same bytes: still current
    assert check_index(out, spec, 1) is None
    m.write_text("a.jpg\nc.jpg\n")
    assert "content changed" in check_index(out, resolve_input(str(m)), 1)
    assert "shards of 1" in check_index(out, spec, 2)
    other = resolve_input(str(m), InputOptions(max_bytes=5))
    assert "other input options" in check_index(out, other, 1)
    assert "cannot be read" in check_index(tmp_path / "nope.parquet", spec, 1)


def test_tar_pattern_and_list_inputs(tmp_path):
    good_shard(tmp_path / "000000.tar", ["k0", "k1"])
    hostile_shard(tmp_path / "000001.tar")
    spec = resolve_input(str(tmp_path / "{000000..000001}.tar"))
    assert spec.kind == "tar" and len(spec.files) == 2
    info = build_index(spec, tmp_path / "i.parquet", 4)
    idx = ManifestIndex(tmp_path / "i.parquet")
    refs = [r for s in range(idx.n_shards) for r in idx.refs(s)]
    assert [r.key for r in refs][:4] == ["k0", "k1", "ok1", "../../etc/x"]
    assert refs[0].resolved.startswith("tar:") and refs[3].resolved.startswith("rejected:status=unsafe_member")
    assert refs[0].extra == {"txt": "alt text of k0", "json": '{"key": "k0", "url": "https://example.org/k0.png"}'}
    assert info.extra_types == {"txt": pa.string(), "json": pa.string()}
    (tmp_path / "shards.txt").write_text("000000.tar\n000001.tar\n000000.tar\n")
    listed = resolve_input(str(tmp_path / "shards.txt"))
    assert listed.kind == "tar" and listed.files == ("000000.tar", "000001.tar")
    assert check_index(tmp_path / "i.parquet", spec, 4) is None
    good_shard(tmp_path / "000000.tar", ["k0", "k9"])
    assert "content changed" in check_index(tmp_path / "i.parquet", spec, 4)
    (tmp_path / "dup.tar").write_bytes((tmp_path / "000000.tar").read_bytes())
    with pytest.raises(JobError, match="key 'k0' is used twice"):
        build_index(resolve_input(str(tmp_path / "{000000,dup}.tar")), tmp_path / "j.parquet", 4)


def test_parquet_bytes_inputs(tmp_path):
    bytes_parquet(tmp_path / "p0.parquet", 5, seed=0, nulls=(2,), row_group_size=2)
    bytes_parquet(tmp_path / "p1.parquet", 3, seed=1)
    spec = resolve_input(str(tmp_path / "p{0..2}.parquet"))
    assert spec.kind == "parquet_bytes"
    info = build_index(spec, tmp_path / "i.parquet", 3)
    assert info.n_rows == 9 and set(info.extra_types) == {"caption", "width"}
    idx = ManifestIndex(tmp_path / "i.parquet")
    refs = [r for s in range(idx.n_shards) for r in idx.refs(s)]
    assert [r.path for r in refs][:6] == [f"{tmp_path}/p0.parquet#{i}" for i in range(5)] + [f"{tmp_path}/p1.parquet#0"]
    assert refs[4].resolved.endswith("row_group=2&row=0")
    assert refs[-1].resolved.startswith("rejected:status=missing")        # p2.parquet is not there
    with pytest.raises(JobError, match="no key column 'id'"):
        build_index(resolve_input(str(tmp_path / "p0.parquet"), InputOptions(key_column="id")), tmp_path / "j.parquet", 3)


def test_index_modules_import_no_torch():
    code = ("import sys, pipeline.index, pipeline.sources.fetch, pipeline.index.read; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'models', 'stages', 'jobs')); "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sources_and_index_import_nothing_above_the_core():
    """Static (ast) check, so lazy imports count too: the index and the sources are core modules, and
    the index does not lean on the reference reader (pipeline/manifest.py) it is tested against.
    (pipeline.records is core and torch-free: the index makes the runner's ImageRefs directly.)"""
    import ast

    forbidden = {"torch", "models", "stages", "jobs", "cli", "pipeline.manifest"}
    bad = {}
    for p in [*(ROOT / "pipeline" / "index").rglob("*.py"), *(ROOT / "pipeline" / "sources").rglob("*.py")]:
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            hits = [n for n in names if n.split(".")[0] in forbidden or n in forbidden]
            if hits:
                bad[str(p.relative_to(ROOT))] = hits
    assert bad == {}
