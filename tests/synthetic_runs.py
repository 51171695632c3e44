"""Committed run dirs without a model: the input indexed and run.json written as `caption` does
(pipeline/run_input.py, Ledger.open), then every shard committed by the project's own writer
(stages/write.ShardWriter) from made-up Caption / Failed records. For export, status, finish and
plan tests, and for benchmarks/bookkeeping.py (39,063 shards of a 10M-line manifest)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

from pipeline import fingerprint as fp
from pipeline.config import ArraySlice
from pipeline.index import InputOptions, resolve_input
from pipeline.ledger import Ledger
from pipeline.records import Caption, Failed, ImageRef
from pipeline.run_input import layout_of, open_index
from pipeline.runner import Claim
from pipeline.schema import OutputSchema
from stages.write import ShardWriter

FINGER = fp.make({"config.json": "1:sha256:aa"}, "bunny", "Describe.", None, None, {}, "float32", {}, {})


def record(ref: ImageRef, status: str) -> Caption | Failed:
    """A made-up row: a short caption naming the image, or a failure with `status`."""
    if status != "ok":
        return Failed(ref, "preprocess", status, f"no such file: {ref.resolved}")
    return Caption(ref, f"a photo of {ref.key}", (1, 2, 3), 12, 3, "eos", 64, 48, 0.01, 0.02, 0.03, 0.04)


def start(out: Path, given: str, shard_size: int, options: InputOptions = InputOptions()) -> Ledger:
    """The run dir as planning leaves it (index + run.json), with a made-up fingerprint unless one
    is there already (a run.json written by a real `caption`)."""
    led = Ledger(out)
    idx = open_index(led, resolve_input(given, options), shard_size, overwrite=False)
    if led.peek_run() is None:
        led.open(FINGER, layout_of(idx), {"synthetic": True}, False, ArraySlice())
    else:
        led.read_run()
    return led


def commit_shards(led: Ledger, shards, status_of: Callable[[ImageRef], str] = lambda r: "ok",
                  model: str = "synthetic") -> None:
    """Commit these shards with the project's writer (rows from `record`)."""
    from pipeline.index import ManifestIndex

    idx = ManifestIndex(led.index)
    writer = ShardWriter(led, OutputSchema(idx.extra_types, model, led.fingerprint))
    for s in shards:
        refs = tuple(idx.refs(s))
        writer.commit(Claim(s, None, refs), [record(r, status_of(r)) for r in refs], time.time())


def synthesize(out: Path, given: str, shard_size: int, status_of: Callable[[ImageRef], str] = lambda r: "ok",
               shards=None) -> Ledger:
    led = start(out, given, shard_size)
    commit_shards(led, range(led.layout.n_shards) if shards is None else shards, status_of)
    return led
