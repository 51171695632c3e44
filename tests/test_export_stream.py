"""Every export format and captions.json, written shard by shard (bounded memory), hold exactly
what the whole table in memory gives: the same rows in input order (parquet, csv, jsonl) and the
same sorted {path: caption} (json). A shard that fails its check mid-way publishes nothing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import pipeline.captions_json as cj
import pipeline.export as ex
from pipeline.errors import JobError
from pipeline.export import export_run, finish, iter_shards
from pipeline.ledger import Ledger
from tests.synthetic_runs import synthesize


@pytest.fixture
def run(tmp_path, monkeypatch):
    """17 images under ids in reverse key order (so shards are not key-sorted), two ids naming one
    file, a few failed rows, shards of 3; merge runs and row groups small enough to be exercised."""
    monkeypatch.setattr(cj, "RUN_ROWS", 4)
    monkeypatch.setattr(ex, "ROW_GROUP", 5)
    lines = ["id,path,note"] + [f"id{99 - i:02d},img/{i}.jpg,n{i}" for i in range(16)] + ["id00,img/3.jpg,again"]
    (tmp_path / "m.csv").write_text("\n".join(lines) + "\n")
    led = synthesize(tmp_path / "run", str(tmp_path / "m.csv"), 3,
                     status_of=lambda r: "missing" if r.index % 5 == 2 else "ok")
    return tmp_path / "run", led


def whole(led: Ledger) -> pa.Table:
    bad: list[int] = []
    t = pa.concat_tables(iter_shards(led, led.markers(), bad))
    assert bad == []
    return t


def test_every_format_equals_the_table_in_memory(run, tmp_path):
    out, led = run
    table = whole(led)
    assert table.column("index").to_pylist() == list(range(17))
    got = pq.read_table(export_run(out, "parquet", tmp_path / "x.parquet"))
    assert got.equals(table)
    assert pq.ParquetFile(tmp_path / "x.parquet").metadata.num_row_groups == 4          # ROW_GROUP rows each
    ref_csv = tmp_path / "ref.csv"
    pacsv.write_csv(table, ref_csv)
    assert export_run(out, "csv", tmp_path / "x.csv").read_bytes() == ref_csv.read_bytes()
    lines = export_run(out, "jsonl", tmp_path / "x.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == table.to_pylist()
    ok = sorted((r for r in table.to_pylist() if r["status"] == "ok"), key=lambda r: r["key"])
    mapping: dict[str, str] = {}
    for r in ok:
        mapping.setdefault(r["path"], r["caption"])
    text = export_run(out, "json", tmp_path / "x.json").read_text(encoding="utf-8")
    assert text == json.dumps(mapping, ensure_ascii=False, indent=1) + "\n"
    assert list(json.loads(text))[:2] == ["img/3.jpg", "img/15.jpg"]      # id00 first; img/3.jpg once
    # captions.json of the finished run is that same text
    assert finish(led) == (True, []) and (out / "captions.json").read_text(encoding="utf-8") == text


def _tamper(led: Ledger, shard: int) -> None:
    data = led.shards / f"{shard:05d}.parquet"
    data.write_bytes(data.read_bytes()[:-9] + b"tampered!")


@pytest.mark.parametrize("fmt", ["parquet", "json"])
def test_a_bad_shard_mid_way_publishes_nothing(run, tmp_path, fmt):
    out, led = run
    _tamper(led, 3)
    with pytest.raises(JobError) as e:
        export_run(out, fmt, tmp_path / f"x.{fmt}")
    assert e.value.exit_code == 1 and "shard(s) 3 do not match" in str(e.value)
    assert not (tmp_path / f"x.{fmt}").exists() and not list(tmp_path.glob(".x.*"))
    assert (led.shards / "00003.done.json.bad").exists()


def test_captions_json_is_not_written_over_a_bad_shard(run):
    out, led = run
    _tamper(led, 4)
    assert finish(led) == (False, [4])
    assert not (out / "captions.json").exists() and not list(out.glob(".captions*"))


def test_only_id_manifests_need_the_repeated_path_check(tmp_path, run):
    """captions.json skips the hashed check where paths are unique by construction."""
    from pipeline.index import ManifestIndex
    from tests.source_fixtures import good_shard

    out, led = run
    assert ManifestIndex(led.index).unique_paths is False                     # ids: a file may be listed twice
    (tmp_path / "t.txt").write_text("a.jpg\nb.jpg\na.jpg\n")
    assert ManifestIndex(synthesize(tmp_path / "r1", str(tmp_path / "t.txt"), 2).index).unique_paths
    good_shard(tmp_path / "0.tar", ["k0", "k1"])
    assert ManifestIndex(synthesize(tmp_path / "r2", str(tmp_path / "0.tar"), 2).index).unique_paths
