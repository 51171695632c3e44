"""Write stage: a finished shard's records -> one Parquet file + its done marker (via the ledger,
which writes both atomically: readers and re-runs never see a partial file). Reading shards back
and exporting them is pipeline/export.py.
"""

from __future__ import annotations

import logging
import time
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.ledger import Ledger, ShardMarker
from pipeline.records import Caption, Failed, ResultRow
from pipeline.runner import Claim
from pipeline.schema import OutputSchema

log = logging.getLogger(__name__)

# Bumped whenever this stage's output can change for the same input: it is part of the run
# fingerprint, so a run dir never mixes rows from before and after such a change.
VERSION = 1

STAGE_COLUMNS = ("preprocess_s", "encode_s", "prefill_s", "decode_s")


def _sum(table: pa.Table, column: str) -> float:
    v = pc.sum(table.column(column)).as_py()
    return float(v or 0.0)


class ShardWriter:
    def __init__(self, ledger: Ledger, schema: OutputSchema):
        self.ledger = ledger
        self.schema = schema

    def merged(self, claim: Claim, new: pa.Table) -> pa.Table:
        """A retry's new rows with the rows it keeps from the committed shard, in manifest order."""
        if claim.keep is None:
            return new
        merged = pa.concat_tables([claim.keep.cast(self.schema.schema), new])
        return merged.take(pc.sort_indices(merged, sort_keys=[("index", "ascending")]))

    def commit(self, claim: Claim, records: list[Caption | Failed], started: float) -> ShardMarker:
        new = self.schema.table([(r.ref, ResultRow.from_record(r)) for r in records])
        table = self.merged(claim, new)
        status = dict(sorted(Counter(table.column("status").to_pylist()).items()))
        now = time.time()
        timings = {c: round(_sum(new, c), 6) for c in STAGE_COLUMNS}
        timings["wall_s"] = round(now - started, 6)
        marker = ShardMarker(shard=claim.shard, file=self.ledger.data_file(claim.shard, claim.attempt), bytes=0,
                             rows=table.num_rows, status=status, fingerprint="", attempt=claim.attempt,
                             processed=len(records), started=started, finished=now, timings=timings,
                             new_tokens=int(_sum(new, "n_new_tokens")))
        marker = self.ledger.commit(marker, lambda tmp: pq.write_table(table, tmp, compression="zstd"))
        log.debug("shard %d committed: %s", claim.shard, marker.file)
        return marker
