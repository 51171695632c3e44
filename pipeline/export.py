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
import json
import logging
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.atomic import write_atomic
from pipeline.captions_json import SortedCaptions, write_json
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.ledger import CAPTIONS_JSON, Ledger, ShardMarker, io_error

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("json", "jsonl", "csv", "parquet")
ROW_GROUP = 1 << 17            # rows per row group of a Parquet export (shards are far smaller)


class ShardMismatch(Exception):
    """A committed shard's data is not what its done marker says."""


class _Bad(Exception):
    """Raised inside an atomic write to discard the file: some shard failed its check."""


def read_shard(ledger: Ledger, m: ShardMarker) -> pa.Table:
    """A committed shard's rows, checked against its marker: the SHA-256 of the file, then the
    table's own `shard` and `index` columns (a copy of another shard's file has the wrong ones)
    and its row and status counts. ShardMismatch says what does not match."""
    path = ledger.shards / m.file
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ShardMismatch(f"{m.file} cannot be read ({e.strerror or e})") from None
    if hashlib.sha256(data).hexdigest() != m.sha256:
        raise ShardMismatch(f"{m.file} changed after it was committed (its SHA-256 differs from the marker's)")
    try:
        table = pq.read_table(pa.BufferReader(data))
        shards, index = table.column("shard").to_pylist(), table.column("index").to_pylist()
        status = Counter(table.column("status").to_pylist())
    except (pa.ArrowException, KeyError, OSError) as e:
        raise ShardMismatch(f"{m.file} is not a readable shard ({e})") from None
    want = ledger.layout.indices(m.shard)
    if set(shards) != {m.shard} or sorted(index) != list(want):
        raise ShardMismatch(f"{m.file} holds rows of shard(s) {sorted(set(shards))[:3]} at manifest positions "
                            f"{min(index, default='-')}..{max(index, default='-')}, not shard {m.shard}'s "
                            f"{want.start}..{want.stop - 1}")
    if table.num_rows != m.rows or dict(status) != m.status:
        raise ShardMismatch(f"{m.file} has {table.num_rows} rows {dict(status)}, the marker says {m.rows} {m.status}")
    return table


def iter_shards(ledger: Ledger, markers: dict[int, ShardMarker], bad: list[int]) -> Iterator[pa.Table]:
    """The checked rows of the given shards, one shard at a time in input order. A shard that
    fails its check is set aside (the next caption run redoes it), appended to `bad` and skipped."""
    for s in sorted(markers):
        try:
            yield read_shard(ledger, markers[s])
        except ShardMismatch as e:
            ledger.set_aside(markers[s], str(e))
            bad.append(s)


Writer = Callable[[Path, Iterator[pa.Table]], int]        # (temp file, shards) -> entries written


def _streamed(write: Writer, ledger: Ledger, markers: dict[int, ShardMarker], out: Path) -> tuple[int, list[int]]:
    """write(tmp, shards) into `out` atomically: (entries written, the shards that failed their
    check; if any, nothing is published)."""
    bad: list[int] = []
    n = 0

    def run(tmp: Path) -> None:
        nonlocal n
        n = write(tmp, iter_shards(ledger, markers, bad))
        if bad:
            raise _Bad

    try:
        write_atomic(out, run)
    except _Bad:
        pass
    except OSError as e:
        raise io_error(out.parent, e) from None
    return n, bad


def _json(tmp: Path, shards: Iterator[pa.Table]) -> int:
    with tempfile.TemporaryDirectory(prefix=".captions-merge-", dir=tmp.parent) as work:
        sorter = SortedCaptions(Path(work))
        for t in shards:
            sorter.add(t)
        return write_json(sorter.items(), tmp)


def _jsonl(tmp: Path, shards: Iterator[pa.Table]) -> int:
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
        for t in shards:
            f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in t.to_pylist())
            n += t.num_rows
    return n


def _same_schema(t: pa.Table, schema: pa.Schema) -> pa.Table:
    return t if t.schema.equals(schema) else t.select(schema.names).cast(schema)


def _csv(tmp: Path, shards: Iterator[pa.Table]) -> int:
    first = next(shards, None)
    if first is None:
        tmp.write_bytes(b"")
        return 0
    n = first.num_rows
    with pacsv.CSVWriter(str(tmp), first.schema) as w:
        w.write_table(first)
        for t in shards:
            w.write_table(_same_schema(t, first.schema))
            n += t.num_rows
    return n


def _parquet(tmp: Path, shards: Iterator[pa.Table]) -> int:
    first = next(shards, None)
    if first is None:
        tmp.write_bytes(b"")
        return 0
    schema = first.schema
    buf, n, total = [first], first.num_rows, first.num_rows
    with pq.ParquetWriter(str(tmp), schema, compression="zstd") as w:
        for t in shards:
            buf.append(_same_schema(t, schema))
            n += t.num_rows
            total += t.num_rows
            if n >= ROW_GROUP:                      # row groups of ROW_GROUP rows, not one per shard
                t = pa.concat_tables(buf)
                k = n // ROW_GROUP * ROW_GROUP
                w.write_table(t.slice(0, k), row_group_size=ROW_GROUP)
                buf, n = [t.slice(k)], n - k
        if buf:
            w.write_table(pa.concat_tables(buf), row_group_size=ROW_GROUP)
    return total


WRITERS: dict[str, Writer] = {
    "json": _json, "jsonl": _jsonl, "csv": _csv, "parquet": _parquet}


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
    count, bad = _streamed(_json, ledger, markers, path)
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
    count, bad = _streamed(WRITERS[fmt], ledger, markers, target)
    if bad:
        raise JobError(f"{run_dir}: shard(s) {', '.join(map(str, bad[:10]))} do not match their done markers and "
                       f"were set aside (see above); re-run the caption command to redo them, then export",
                       EXIT_INFRA)
    log.info("exported %d %s from %d shard(s) to %s%s", count, "captions" if fmt == "json" else "rows", len(markers),
             target, f" ({missing} shard(s) missing)" if missing else "")
    return target
