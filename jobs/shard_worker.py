"""The one shard worker: a model on a device and a preprocessing pool, running shards to commits.

    shards ──> claim (flock; temps of killed writers removed; the shard's refs read from the
               input's index, or for --retry-failed its failed rows) ──> Runner: screen (rows
               for files that cannot be opened) -> preprocess pool -> encoder -> caption engine
               ──> ShardWriter: Parquet + done marker ──> RunSummary

img2dataset's shape: one worker, many distributors. The local loop (jobs/caption.py) builds one
and gives it every pending shard in one call, so one stream spans shard boundaries and the
engine's slots stay full; each Ray actor (jobs/caption_ray.py) builds one and gives it one shard
per call. Either way a shard is claimed, captioned, written and marked done by the same code,
which is what lets the two engines resume each other's run dirs.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Callable

import pyarrow.compute as pc
import torch
from tqdm.contrib.logging import logging_redirect_tqdm

from models.base import dtype_name
from pipeline.config import RunConfig
from pipeline.device import cpu_kernels, describe
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.export import ShardMismatch, read_shard
from pipeline.index import ManifestIndex
from pipeline.ledger import Ledger, ShardMarker
from pipeline.progress import Progress
from pipeline.records import Failed
from pipeline.runner import Claim, Runner, RunSummary, ShardWork, Stages
from pipeline.schema import OutputSchema
from pipeline.screen import screen
from pipeline.workers import OrderedPool
from stages.preprocess import Preprocessor
from stages.write import ShardWriter

log = logging.getLogger(__name__)


def claim_shard(ledger: Ledger, index: ManifestIndex, w: ShardWork) -> Claim | None:
    """Lock the shard, re-check it is still to do and make its refs (only now: planning holds
    none); None = skip it (another process has it or did it). Under the lock, the temp files a
    killed writer left for this shard are removed. A --retry-failed shard is read back (and
    verified) here: its failed rows are redone, the others kept; one whose data no longer matches
    its marker is set aside and redone whole."""
    lock = ledger.try_lock(w.shard)
    if lock is None:
        log.info("shard %d is being worked on by another process; skipping it", w.shard)
        return None
    try:
        ledger.remove_temps(w.shard)
        m = ledger.marker(w.shard)
        if not w.retry:
            if m is not None:                        # committed meanwhile by another process
                lock.release()
                return None
            return Claim(w.shard, lock, tuple(index.refs(w.shard)))
        if m is None or m.attempt >= w.attempt:      # set aside or retried meanwhile
            lock.release()
            return None
        try:
            table = read_shard(ledger, m)
        except ShardMismatch as e:
            ledger.set_aside_locked(m, str(e))
            return Claim(w.shard, lock, tuple(index.refs(w.shard)))
        ok = pc.equal(table.column("status"), "ok")
        redo = set(table.filter(pc.invert(ok)).column("index").to_pylist())
        return Claim(w.shard, lock, tuple(index.refs(w.shard, redo)), attempt=w.attempt, keep=table.filter(ok))
    except BaseException:
        lock.release()
        raise


def open_run_index(ledger: Ledger) -> ManifestIndex:
    """The run dir's input index, which must be the one its run.json was made from (the planner
    built or checked it; another process could have replaced it with --overwrite since)."""
    try:
        index = ManifestIndex(ledger.index)
    except (OSError, ValueError) as e:
        raise JobError(f"{ledger.index}: the run's input index cannot be read ({e}); re-run the caption "
                       f"command to rebuild it") from None
    if index.identity != ledger.layout.input or index.shard_size != ledger.layout.shard_size:
        raise JobError(f"{ledger.index} is not the index of this run's input (another process replaced it, "
                       f"e.g. with --overwrite); re-run the caption command")
    return index


class ShardWorker:
    """Built once per process (local run or Ray actor); closes its pool on close()/exit."""

    def __init__(self, cfg: RunConfig, question: str, template: str | None, ledger: Ledger,
                 device: torch.device, dtype: torch.dtype, workers: int):
        from models.registry import load_model
        from stages.caption.engine import CaptionEngine
        from stages.encode import VisionEncoder

        self.cfg = cfg
        self.ledger = ledger
        index = open_run_index(ledger)
        self.claim = lambda w: claim_shard(ledger, index, w)
        pre = Preprocessor(cfg.model, question, template, cfg.limits, cfg.fetch)
        # workers == 0: OrderedPool sets `pre` up and runs it inline, in this process
        self.pool = OrderedPool(pre, workers, ahead=cfg.batch.in_flight(workers),
                                on_crash=lambda ref, msg: Failed(ref, "preprocess", "worker_crashed", msg),
                                time_limit_s=cfg.limits.max_seconds if workers else None,
                                on_timeout=lambda ref, msg: Failed(ref, "preprocess", "timeout", msg))
        self.pool.start()             # spawns now: the workers' start-up (imports, tokenizer) overlaps the model load
        try:
            t0 = time.perf_counter()
            loaded = load_model(cfg.model, dtype, device, kernels=cpu_kernels(device, dtype))
            if hasattr(loaded.model, "max_crops_per_call"):
                loaded.model.max_crops_per_call = cfg.batch.crops_per_call
            self.load_s = time.perf_counter() - t0
            self.encoder = VisionEncoder(loaded)
            self.make_engine = lambda: CaptionEngine(loaded, cfg.decode, cfg.batch)
            self.writer = ShardWriter(ledger, OutputSchema(index.extra_types, loaded.name, ledger.fingerprint))
            self.where = f"{describe(device)}, {dtype_name(dtype)}; {loaded.kernels}"
            log.info("model %s (%s) loaded on %s in %.1f s", loaded.name, loaded.family, self.where, self.load_s)
            try:
                self.pool.wait_ready()
            except RuntimeError as e:
                raise JobError(str(e), EXIT_INFRA) from None
        except BaseException:
            self.pool.close()
            raise

    def run(self, work: list[ShardWork], progress: Progress,
            on_commit: Callable[[Claim, ShardMarker], None] | None = None) -> RunSummary:
        """Claim, caption and commit these shards (skipping those another process holds or did)."""

        def commit(claim: Claim, records, started: float) -> None:
            marker = self.writer.commit(claim, records, started)
            if on_commit is not None:
                on_commit(claim, marker)

        stages = Stages(pool=self.pool, encode=self.encoder, make_engine=self.make_engine, claim=self.claim,
                        release=lambda lock: lock.release(), commit=commit, progress=progress,
                        encode_batch=self.cfg.batch.encode_batch, screen=screen)
        with logging_redirect_tqdm():            # log lines above the progress bar, not through it
            return Runner(stages).run(work)

    def close(self) -> None:
        self.pool.close()

    def __enter__(self) -> "ShardWorker":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def combine(summaries: list[RunSummary], wall_s: float, workers: int = 1) -> RunSummary:
    """One RunSummary for several (shards of a Ray run, passes of a local one). Stage seconds are
    averaged over the workers, so the "model busy" share reads per worker."""
    status: dict[str, int] = defaultdict(int)
    stages: dict[str, float] = defaultdict(float)
    for s in summaries:
        for k, v in s.status.items():
            status[k] += v
        for k, v in s.stages.items():
            stages[k] += v / max(1, workers)
    return RunSummary(committed=tuple(x for s in summaries for x in s.committed),
                      failed=tuple(x for s in summaries for x in s.failed),
                      busy=tuple(x for s in summaries for x in s.busy),
                      not_started=tuple(x for s in summaries for x in s.not_started),
                      images=sum(s.images for s in summaries), status=dict(status),
                      new_tokens=sum(s.new_tokens for s in summaries), wall_s=wall_s, stages=dict(stages))
