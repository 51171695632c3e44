"""captions.json streamed by an external merge sort (pipeline/captions_json.py) == the in-memory
mapping it replaces, on generated shards: any key order, runs spilled or not, overlapping or not,
failed rows, paths shared by several keys (written once, for the first key), unicode and escapes."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pipeline.captions_json as cj

_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=6)


@st.composite
def shards(draw):
    """Tables of (key, path, caption, status) with unique keys, cut into shards of any size."""
    keys = draw(st.lists(_text, unique=True, max_size=80))
    if draw(st.booleans()):
        keys.sort()                                      # an input already in key order: runs do not overlap
    paths = [draw(st.one_of(st.just(k), st.sampled_from(["same.jpg", "other.jpg"]), _text)) for k in keys]
    rows = [{"key": k, "path": p, "caption": draw(_text), "status": draw(st.sampled_from(["ok", "ok", "missing"])),
             "extra": i} for i, (k, p) in enumerate(zip(keys, paths))]
    cuts = sorted(draw(st.lists(st.integers(0, len(rows)), max_size=25)))
    bounds = [0, *cuts, len(rows)]
    return [pa.Table.from_pylist(rows[a:b], schema=pa.schema([("key", pa.string()), ("path", pa.string()),
                                                                ("caption", pa.string()), ("status", pa.string()),
                                                                ("extra", pa.int64())]))
            for a, b in zip(bounds, bounds[1:])]


def expected(tables: list[pa.Table]) -> str:
    rows = sorted((r for t in tables for r in t.to_pylist() if r["status"] == "ok"), key=lambda r: r["key"])
    out: dict[str, str] = {}
    for r in rows:
        out.setdefault(r["path"], r["caption"])          # a path named by several keys: its first key's caption
    return json.dumps(out, ensure_ascii=False, indent=1) + "\n"


def _check(tables, run_rows, tmp_path_factory, monkeypatch) -> None:
    monkeypatch.setattr(cj, "RUN_ROWS", run_rows)
    monkeypatch.setattr(cj, "BATCH", 3)
    work = tmp_path_factory.mktemp("merge")
    sorter = cj.SortedCaptions(work)
    for t in tables:
        sorter.add(t)
    n = cj.write_json(sorter.items(), work / "captions.json")
    text = (work / "captions.json").read_text(encoding="utf-8")
    assert text == expected(tables)
    assert n == len(json.loads(text))


def _property(examples: int, derandomize: bool, tmp_path_factory, monkeypatch) -> None:
    @settings(max_examples=examples, derandomize=derandomize, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(tables=shards(), run_rows=st.integers(1, 12))
    def check(tables, run_rows):
        _check(tables, run_rows, tmp_path_factory, monkeypatch)

    check()


def test_streamed_captions_json_equals_the_mapping(tmp_path_factory, monkeypatch):
    _property(150, True, tmp_path_factory, monkeypatch)


@pytest.mark.slow
def test_streamed_captions_json_equals_the_mapping_many(tmp_path_factory, monkeypatch):
    _property(3000, False, tmp_path_factory, monkeypatch)


def test_empty_mapping_and_runs_spilled_as_rows_come_in(tmp_path, monkeypatch):
    sorter = cj.SortedCaptions(tmp_path)
    cj.write_json(sorter.items(), tmp_path / "c.json")
    assert (tmp_path / "c.json").read_text() == "{}\n" == json.dumps({}, indent=1) + "\n"
    monkeypatch.setattr(cj, "RUN_ROWS", 2)
    sorter = cj.SortedCaptions(tmp_path)
    for i in (5, 3, 9, 1, 7):
        sorter.add(pa.table({"key": [f"k{i}"], "path": [f"p{i}"], "caption": [f"c{i}"], "status": ["ok"]}))
    assert len(sorter.runs) == 2                         # spilled as the rows came in
    assert [p for p, _ in sorter.items()] == ["p1", "p3", "p5", "p7", "p9"]
