"""Reading committed shards back, and merging them into one file (json | jsonl | csv | parquet).

Shards are read only here (captions.json, `pipeline export`, --retry-failed), so this is where a
shard's content is checked against its done marker; the resume scan itself stays cheap (names
and sizes, pipeline/ledger.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.atomic import write_atomic, write_text_atomic
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.ledger import CAPTIONS_JSON, Ledger, ShardMarker

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("json", "jsonl", "csv", "parquet")


class ShardMismatch(Exception):
    """A committed shard's data is not what its done marker says."""


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


def read_shards(ledger: Ledger, markers: dict[int, ShardMarker]) -> tuple[pa.Table | None, list[int]]:
    """The checked rows of the given shards in manifest order, and the shards that failed the
    check: their markers are set aside (pipeline/ledger.py), so the next caption run redoes them."""
    tables, bad = [], []
    for s in sorted(markers):
        try:
            tables.append(read_shard(ledger, markers[s]))
        except ShardMismatch as e:
            ledger.set_aside(markers[s], str(e))
            bad.append(s)
    if not tables:
        return None, bad
    table = pa.concat_tables(tables, promote_options="default")
    return table.take(pc.sort_indices(table, sort_keys=[("index", "ascending")])), bad


def captions_mapping(table: pa.Table) -> dict[str, str]:
    """{path as in the manifest: caption} of the captioned rows, ordered by key (failures are left
    out: they are rows with a status in the Parquet output)."""
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    ok = ok.take(pc.sort_indices(ok, sort_keys=[("key", "ascending")]))
    return dict(zip(ok.column("path").to_pylist(), ok.column("caption").to_pylist()))


def export(table: pa.Table, fmt: str, out: Path) -> Path:
    if fmt == "json":
        write_text_atomic(out, json.dumps(captions_mapping(table), ensure_ascii=False, indent=1) + "\n")
    elif fmt == "jsonl":
        lines = (json.dumps(row, ensure_ascii=False) for row in table.to_pylist())
        write_text_atomic(out, "".join(line + "\n" for line in lines))
    elif fmt == "csv":
        write_atomic(out, lambda tmp: pacsv.write_csv(table, tmp))
    elif fmt == "parquet":
        write_atomic(out, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return out


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
    table, bad = read_shards(ledger, markers)
    if bad:
        raise JobError(f"{run_dir}: shard(s) {', '.join(map(str, bad[:10]))} do not match their done markers and "
                       f"were set aside (see above); re-run the caption command to redo them, then export",
                       EXIT_INFRA)
    export(table, fmt, target)
    log.info("exported %d shard(s) to %s%s", len(markers), target, f" ({missing} missing)" if missing else "")
    return target
