"""Reading committed shards back, and merging them into one file (json | jsonl | csv | parquet),
shard by shard: memory stays bounded at any run size (one shard, plus one Parquet row group or
one merge run; pipeline/captions_json.py for the sorted `{path: caption}` JSON).

Shards are read only here (captions.json, `pipeline export`, --retry-failed), so this is where a
shard's content is checked against its done marker; the resume scan itself stays cheap (names
and sizes, pipeline/ledger.py). A shard that fails the check is set aside (its marker renamed,
so the next caption run redoes it) and the file being written is discarded: an export or a
captions.json is only ever published whole.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.atomic import write_atomic
from pipeline.captions_json import COLUMNS as CAPTION_COLUMNS, SortedCaptions, write_json
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.index import ManifestIndex
from pipeline.ledger import CAPTIONS_JSON, Ledger, ShardMarker, io_error

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("json", "jsonl", "csv", "parquet")
ROW_GROUP = 1 << 17            # rows per row group of a Parquet export (shards are far smaller)


class ShardMismatch(Exception):
    """A committed shard's data is not what its done marker says."""


class _Bad(Exception):
    """Raised inside an atomic write to discard the file: some shard failed its check."""


CHECKED = ("shard", "index", "status")          # the columns read_shard checks against the marker


def read_shard(ledger: Ledger, m: ShardMarker, columns: list[str] | None = None) -> pa.Table:
    """A committed shard's rows (all columns, or `columns` plus the checked ones), checked against
    its marker: the SHA-256 of the file, then the table's own `shard` and `index` columns (a copy
    of another shard's file has the wrong ones) and its row and status counts. ShardMismatch says
    what does not match. Small shards are many: ParquetFile on the bytes, one thread (a dataset
    read costs 4x more per file)."""
    path = ledger.shards / m.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardMismatch(f"{m.file} cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != m.sha256:
        raise ShardMismatch(f"{m.file} changed after it was committed (its SHA-256 differs from the marker's)")
    want = ledger.layout.indices(m.shard)
    try:
        cols = None if columns is None else list(dict.fromkeys([*columns, *CHECKED]))
        table = pq.ParquetFile(pa.BufferReader(data)).read(columns=cols, use_threads=False)
        shards = pc.unique(table.column("shard")).to_pylist()
        index = np.sort(table.column("index").to_numpy())
        status = {d["values"]: d["counts"] for d in pc.value_counts(table.column("status")).to_pylist()}
    except (pa.ArrowException, KeyError, OSError, ValueError) as e:
        raise ShardMismatch(f"{m.file} is not a readable shard ({e})") from None
    if shards != [m.shard] or not np.array_equal(index, np.arange(want.start, want.stop)):
        raise ShardMismatch(f"{m.file} holds rows of shard(s) {sorted(shards)[:3]} at manifest positions "
                            f"{index.min(initial=-1)}..{index.max(initial=-1)}, not shard {m.shard}'s "
                            f"{want.start}..{want.stop - 1}")
    if table.num_rows != m.rows or status != m.status:
        raise ShardMismatch(f"{m.file} has {table.num_rows} rows {status}, the marker says {m.rows} {m.status}")
    return table


def iter_shards(ledger: Ledger, markers: dict[int, ShardMarker], bad: list[int],
                columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The checked rows of the given shards, one shard at a time in input order. A shard that
    fails its check is set aside (the next caption run redoes it), appended to `bad` and skipped."""
    for s in sorted(markers):
        try:
            yield read_shard(ledger, markers[s], columns)
        except ShardMismatch as e:
            ledger.set_aside(markers[s], str(e))
            bad.append(s)


Writer = Callable[[Path, Iterator[pa.Table]], int]        # (temp file, shards) -> entries written


def _streamed(write: Writer, ledger: Ledger, markers: dict[int, ShardMarker], out: Path,
              columns: list[str] | None = None) -> tuple[int, list[int]]:
    """write(tmp, shards) into `out` atomically, the shards read with `columns` (None: all): (entries
    written, the shards that failed their check; if any, nothing is published)."""
    bad: list[int] = []
    n = 0

    def run(tmp: Path) -> None:
        nonlocal n
        n = write(tmp, iter_shards(ledger, markers, bad, columns))
        if bad:
            raise _Bad

    try:
        write_atomic(out, run)
    except _Bad:
        pass
    except OSError as e:
        raise io_error(out.parent, e) from None
    return n, bad


def _captions_json(ledger: Ledger, markers: dict[int, ShardMarker], out: Path) -> tuple[int, list[int]]:
    """The sorted {path: caption} JSON into `out`, reading only the columns it needs."""
    try:
        unique = ManifestIndex(ledger.index).unique_paths
    except (OSError, ValueError, pa.ArrowException):
        unique = False                          # the index is gone: check

    def write(tmp: Path, shards: Iterator[pa.Table]) -> int:
        with tempfile.TemporaryDirectory(prefix=".captions-merge-", dir=tmp.parent) as work:
            sorter = SortedCaptions(Path(work), unique_paths=unique)
            for t in shards:
                sorter.add(t)
            return write_json(sorter.items(), tmp)

    return _streamed(write, ledger, markers, out, list(CAPTION_COLUMNS))


def _jsonl(tmp: Path, shards: Iterator[pa.Table]) -> int:
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
        for t in shards:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in t.to_pylist())
            n += t.num_rows
    return n


def _aligned(shards: Iterator[pa.Table]) -> tuple[pa.Schema | None, Iterator[pa.Table]]:
    """The first shard's schema (None if there is none) and every shard in it (a run's shards share one)."""
    first = next(shards, None)
    if first is None:
        return None, iter(())
    schema = first.schema
    return schema, itertools.chain([first], (t if t.schema.equals(schema) else t.select(schema.names).cast(schema)
                                             for t in shards))


def _regrouped(tables: Iterator[pa.Table], rows: int) -> Iterator[pa.Table]:
    """The tables re-cut into tables of exactly `rows` rows (the last one fewer)."""
    buf: list[pa.Table] = []
    n = 0
    for t in tables:
        buf.append(t)
        n += t.num_rows
        if n >= rows:
            whole = pa.concat_tables(buf)
            k = n // rows * rows
            yield whole.slice(0, k)
            buf, n = [whole.slice(k)], n - k
    if n:
        yield pa.concat_tables(buf)


def _tables(tmp: Path, shards: Iterator[pa.Table], open_writer: Callable[[str, pa.Schema], Any],
            rows: int | None = None) -> int:
    """Every shard through one Arrow writer (csv, parquet); `rows`: re-cut into tables of that many."""
    schema, tables = _aligned(shards)
    if schema is None:
        tmp.write_bytes(b"")
        return 0
    n = 0
    how = {} if rows is None else {"row_group_size": rows}
    with open_writer(str(tmp), schema) as w:
        for t in (tables if rows is None else _regrouped(tables, rows)):
            w.write_table(t, **how)
            n += t.num_rows
    return n


def _csv(tmp: Path, shards: Iterator[pa.Table]) -> int:
    return _tables(tmp, shards, pacsv.CSVWriter)


def _parquet(tmp: Path, shards: Iterator[pa.Table]) -> int:
    """Row groups of ROW_GROUP rows, not one per shard (39,000 tiny row groups read badly)."""
    return _tables(tmp, shards, lambda path, schema: pq.ParquetWriter(path, schema, compression="zstd"), ROW_GROUP)


WRITERS: dict[str, Writer] = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet}         # json: _captions_json


def finish(ledger: Ledger) -> tuple[bool, list[int]]:
    """Write captions.json if every shard of the run is committed (by any process) and each one
    read for it matches its marker. Returns (complete, shards set aside by that check: planning
    again redoes them). Counts marker names first, so an unfinished run parses no marker here."""
    n = ledger.layout.n_shards
    marked = ledger.marked()
    markers = ledger.markers() if len(marked) == n else {}
    if len(markers) < n:
        log.info("%d of %d shards committed; captions.json is written when all are", len(markers or marked), n)
        return False, []
    path = ledger.root / CAPTIONS_JSON
    newest = max(ledger.marker_mtime_ns(s) for s in markers)
    if path.exists() and path.stat().st_mtime_ns > newest:
        # a no-op re-run (hourly cron on a finished run) must not re-read millions of rows
        log.info("run complete; %s is up to date", path)
        return True, []
    count, bad = _captions_json(ledger, markers, path)
    if bad:
        return False, bad
    log.info("run complete: %d captions in %s", count, path)
    return True, []


def export_run(run_dir: str | Path, fmt: str, out: str | Path | None = None, partial: bool = False) -> Path:
    """Merge the committed shards into one file: RUN_DIR/captions.<fmt> by default, or
    RUN_DIR/captions.partial.<fmt> with --partial (RUN_DIR/captions.json means "complete" to
    everything downstream, so a partial export never writes it)."""
    if fmt not in EXPORT_FORMATS:
        raise JobError(f"--format must be one of {', '.join(EXPORT_FORMATS)} (got {fmt!r})")
    ledger = Ledger(run_dir)
    ledger.read_run()
    markers = ledger.markers()
    missing = ledger.layout.n_shards - len(markers)
    if not markers:
        raise JobError(f"{run_dir}: no shard is committed yet; nothing to export")
    if missing and not partial:
        raise JobError(f"{run_dir}: {missing} shard(s) are not committed yet; finish the run "
                       f"(re-run the caption command) or pass --partial to export what is done")
    target = Path(out) if out else Path(run_dir) / (f"captions.partial.{fmt}" if partial else f"captions.{fmt}")
    if missing and target.resolve() == (ledger.root / CAPTIONS_JSON).resolve():
        raise JobError(f"{target} means a complete run to everything downstream; give --partial another -o")
    count, bad = (_captions_json(ledger, markers, target) if fmt == "json"
                  else _streamed(WRITERS[fmt], ledger, markers, target))
    if bad:
        raise JobError(f"{run_dir}: shard(s) {', '.join(map(str, bad[:10]))} do not match their done markers and "
                       f"were set aside (see above); re-run the caption command to redo them, then export",
                       EXIT_INFRA)
    log.info("exported %d %s from %d shard(s) to %s%s", count, "captions" if fmt == "json" else "rows", len(markers),
             target, f" ({missing} shard(s) missing)" if missing else "")
    return target
