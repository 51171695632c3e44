"""Write stage: a finished shard's records -> one Parquet file + its done marker (via the ledger);
and merging committed shards into one export file (json | jsonl | csv | parquet).

Every file goes through ledger.atomic_write (temp name, fsync, rename), so readers and re-runs
never see a partial file.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipeline.ledger import Ledger, ShardMarker, atomic_write, atomic_write_text
from pipeline.records import Caption, Failed, ResultRow
from pipeline.runner import ShardWork
from pipeline.schema import OutputSchema

log = logging.getLogger(__name__)

STAGE_COLUMNS = ("preprocess_s", "encode_s", "prefill_s", "decode_s")
EXPORT_FORMATS = ("json", "jsonl", "csv", "parquet")


def _sum(table: pa.Table, column: str) -> float:
    v = pc.sum(table.column(column)).as_py()
    return float(v or 0.0)


class ShardWriter:
    def __init__(self, ledger: Ledger, schema: OutputSchema):
        self.ledger = ledger
        self.schema = schema

    def merged(self, work: ShardWork, new: pa.Table) -> pa.Table:
        """A retry's new rows with the rows it keeps from the committed shard, in manifest order."""
        if work.keep is None:
            return new
        merged = pa.concat_tables([work.keep.cast(self.schema.schema), new])
        return merged.take(pc.sort_indices(merged, sort_keys=[("index", "ascending")]))

    def commit(self, work: ShardWork, records: list[Caption | Failed], started: float) -> ShardMarker:
        new = self.schema.table([(r.ref, ResultRow.from_record(r)) for r in records])
        table = self.merged(work, new)
        status = dict(sorted(Counter(table.column("status").to_pylist()).items()))
        now = time.time()
        timings = {c: round(_sum(new, c), 6) for c in STAGE_COLUMNS}
        timings["wall_s"] = round(now - started, 6)
        marker = ShardMarker(shard=work.shard, file=self.ledger.data_file(work.shard, work.attempt), bytes=0,
                             rows=table.num_rows, status=status, fingerprint="", attempt=work.attempt,
                             processed=len(records), started=started, finished=now, timings=timings,
                             new_tokens=int(_sum(new, "n_new_tokens")))
        marker = self.ledger.commit(marker, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        log.debug("shard %d committed: %s", work.shard, marker.file)
        return marker


# -- reading and exporting --------------------------------------------------------------------------

def read_shards(ledger: Ledger, markers: dict[int, ShardMarker]) -> pa.Table:
    """The committed rows of the given shards, in manifest order."""
    tables = [pq.read_table(ledger.shards / markers[s].file) for s in sorted(markers)]
    if not tables:
        raise ValueError("no committed shards")
    table = pa.concat_tables(tables, promote_options="default")
    return table.take(pc.sort_indices(table, sort_keys=[("index", "ascending")]))


def captions_mapping(table: pa.Table) -> dict[str, str]:
    """{path as in the manifest: caption} of the captioned rows, ordered by key (failures are left
    out: they are rows with a status in the Parquet output)."""
    ok = table.filter(pc.equal(table.column("status"), "ok"))
    ok = ok.take(pc.sort_indices(ok, sort_keys=[("key", "ascending")]))
    return dict(zip(ok.column("path").to_pylist(), ok.column("caption").to_pylist()))


def export(table: pa.Table, fmt: str, out: Path) -> Path:
    if fmt == "json":
        atomic_write_text(out, json.dumps(captions_mapping(table), ensure_ascii=False, indent=1) + "\n")
    elif fmt == "jsonl":
        lines = (json.dumps(row, ensure_ascii=False) for row in table.to_pylist())
        atomic_write_text(out, "".join(line + "\n" for line in lines))
    elif fmt == "csv":
        atomic_write(out, lambda tmp: pacsv.write_csv(table, tmp))
    elif fmt == "parquet":
        atomic_write(out, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
    else:
        raise ValueError(f"unknown export format {fmt!r}; use one of {', '.join(EXPORT_FORMATS)}")
    return out
