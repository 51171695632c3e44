"""captions.json, streamed: `{path: caption}` of the captioned rows, sorted by key, written in
bounded memory at any run size.

Shards arrive in input order, which is rarely key order, so this is an external merge sort:
the captioned rows (key, path, caption) are gathered into runs of RUN_ROWS rows, each run is
sorted by key with Arrow and spilled to an Arrow IPC file in a temporary folder, and the runs are
then merged (heapq.merge, one batch of each in memory at a time) into the JSON text. When the runs
do not overlap (the input was already in key order) they are simply read one after the other.
Memory: one run being sorted plus one batch per run while merging (~50 MB at 10M rows).

The text is exactly `json.dumps(mapping, ensure_ascii=False, indent=1) + "\\n"`. A path that two
keys share (an id manifest naming one file twice) is written once, for the first key in key
order; such paths are found with the hashed check the index uses (one int64 per row, only
colliding hashes compared exactly), so no set of 10M strings is ever held.
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.index.build import colliding, hash_strings

log = logging.getLogger(__name__)

RUN_ROWS = 1 << 17          # rows sorted in memory at once (~25 MB of short captions)
BATCH = 1 << 11             # rows of each run in memory while merging (77 runs at 10M rows)
COLUMNS = ("key", "path", "caption", "status")        # what a shard must give add()
_COLUMNS = ["key", "path", "caption"]
_encode = json.encoder.encode_basestring          # what json.dumps(s, ensure_ascii=False) writes for a str


def _sorted(tables: list[pa.Table]) -> pa.Table:
    t = pa.concat_tables(tables).combine_chunks()
    return t.take(pc.sort_indices(t, sort_keys=[("key", "ascending")]))


def _rows(table: pa.Table) -> Iterator[tuple[str, str, str]]:
    for batch in table.to_batches(BATCH):
        yield from zip(*(batch.column(c).to_pylist() for c in _COLUMNS))


def _read_run(path: Path) -> Iterator[tuple[str, str, str]]:
    with pa.OSFile(str(path)) as f:
        reader = pa.ipc.open_file(f)
        for i in range(reader.num_record_batches):
            b = reader.get_batch(i)
            yield from zip(*(b.column(c).to_pylist() for c in _COLUMNS))


class SortedCaptions:
    """Collects captioned rows shard by shard (add), then yields (path, caption) in key order (items)."""

    def __init__(self, workdir: Path, unique_paths: bool = False):
        self.workdir = workdir
        self.unique_paths = unique_paths
        self.buf: list[pa.Table] = []
        self.n_buf = 0
        self.runs: list[tuple[Path, str, str]] = []       # (file, first key, last key)
        self.hashes: list[np.ndarray] = []
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        """A shard's rows (any columns incl. key, path, caption, status); only status 'ok' is kept."""
        ok = table.filter(pc.equal(table.column("status"), "ok")).select(_COLUMNS)
        if not ok.num_rows:
            return
        if not self.unique_paths:
            self.hashes.append(hash_strings(ok.column("path").to_pylist()))
        self.buf.append(ok)
        self.n_buf += ok.num_rows
        self.rows += ok.num_rows
        if self.n_buf >= RUN_ROWS:
            self._spill()

    def _spill(self) -> None:
        t = _sorted(self.buf)
        self.buf, self.n_buf = [], 0
        path = self.workdir / f"run-{len(self.runs):06d}.arrow"
        with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, t.schema) as w:
            w.write_table(t, max_chunksize=BATCH)
        keys = t.column("key")
        self.runs.append((path, keys[0].as_py(), keys[-1].as_py()))

    def _merged(self) -> Iterator[tuple[str, str, str]]:
        if not self.runs:
            return _rows(_sorted(self.buf)) if self.buf else iter(())
        if self.buf:
            self._spill()
        ordered = sorted(self.runs, key=lambda r: r[1])
        if all(a[2] < b[1] for a, b in zip(ordered, ordered[1:])):       # no overlap: read them in turn
            return itertools.chain.from_iterable(_read_run(p) for p, _, _ in ordered)
        return heapq.merge(*(_read_run(p) for p, _, _ in self.runs))    # keys are unique: tuples order by key

    def items(self) -> Iterator[tuple[str, str]]:
        """(path, caption) in key order; a path already written for an earlier key is left out."""
        h = np.concatenate(self.hashes) if self.hashes else np.empty(0, np.int64)
        self.hashes = []
        repeated = set(h[colliding(h)].tolist())
        del h
        if not repeated:
            return ((path, caption) for _, path, caption in self._merged())
        return self._first_of_each_path(repeated)

    def _first_of_each_path(self, repeated: set[int]) -> Iterator[tuple[str, str]]:
        seen: set[str] = set()
        dropped = 0
        for _, path, caption in self._merged():
            if hash(path) in repeated:
                if path in seen:
                    dropped += 1
                    continue
                seen.add(path)
            yield path, caption
        if dropped:
            log.warning("captions.json: %d path(s) are named by several keys; each is written once, with the "
                        "caption of its first key (all rows are in the shards and the other exports)", dropped)


def write_json(items: Iterable[tuple[str, str]], path: Path) -> int:
    """Write the pairs as json.dumps(dict(items), ensure_ascii=False, indent=1) + '\\n' would; the count.
    Captions of captioned rows are strings; anything else is written as JSON."""
    n = 0
    enc = _encode
    buf: list[str] = []
    with open(path, "w", encoding="utf-8", newline="\n", buffering=1 << 20) as f:
        f.write("{")
        for p, c in items:
            buf.append(enc(p) + ": " + (enc(c) if c.__class__ is str else json.dumps(c)))
            if len(buf) >= BATCH:
                f.write(("\n " if n == 0 else ",\n ") + ",\n ".join(buf))
                n += len(buf)
                buf.clear()
        if buf:
            f.write(("\n " if n == 0 else ",\n ") + ",\n ".join(buf))
            n += len(buf)
        f.write("\n}\n" if n else "}\n")
    return n
