"""The `caption` job: plan the run (jobs/plan.py), hand the pending shards to a distributor, finish.

    prepare (checks, the input's index, run.json) ─> plan_work ─> local: one ShardWorker, every shard in one stream
                                                               └> ray:   ShardWorkers in Ray actors (jobs/caption_ray.py)
                                                  ─> finish: captions.json (streamed) once every shard is committed

A shard whose data fails verification when captions.json is built is set aside by finish() and
planned again here, once, so the same command repairs it.
"""

from __future__ import annotations

import logging
import time

from jobs.plan import RunPlan, plan_work, prepare, report_end
from jobs.shard_worker import ShardWorker, combine
from pipeline.config import RunConfig
from pipeline.device import cpu_count, set_threads
from pipeline.export import finish
from pipeline.ledger import ShardMarker
from pipeline.progress import Progress, add_log_file
from pipeline.runner import Claim, RunSummary, ShardWork

log = logging.getLogger(__name__)

PASSES = 2          # the second only redoes shards set aside by finish()'s verification


def run_caption(cfg: RunConfig) -> int:
    if cfg.engine == "ray":             # the models run on the cluster's workers: resolved there
        from jobs.caption_ray import resolve_on_cluster
        plan = prepare(cfg, resolve_on_cluster)
    else:
        plan = prepare(cfg)
    handler = add_log_file(plan.ledger.logs, "caption")
    try:
        summaries: list[RunSummary] = []
        t0 = time.perf_counter()
        for _ in range(PASSES):
            work = plan_work(plan)
            _log_plan(plan, work)
            if work:
                summaries.append(_distribute(plan, work))
            complete, set_aside = finish(plan.ledger)
            if not set_aside:
                break
        summary = combine(summaries, time.perf_counter() - t0) if summaries else None
        return report_end(summary, complete, set_aside)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _log_plan(plan: RunPlan, work: list[ShardWork]) -> None:
    cfg, layout = plan.cfg, plan.ledger.layout
    log.info("run %s: %d images in %d shards of %d; this process: %d shard(s) to do%s", plan.ledger.root,
             layout.n_images, layout.n_shards, layout.shard_size, len(work),
             f" (array task {cfg.array.index}/{cfg.array.total})" if cfg.array.total > 1 else "")


def _distribute(plan: RunPlan, work: list[ShardWork]) -> RunSummary:
    if plan.cfg.engine == "ray":
        from jobs.caption_ray import run_ray
        return run_ray(plan, work)
    return run_local(plan, work)


def run_local(plan: RunPlan, work: list[ShardWork]) -> RunSummary:
    """Every shard through one ShardWorker in this process."""
    cfg, ledger = plan.cfg, plan.ledger
    set_threads(cfg.threads)
    done = len(ledger.marked())
    n_shards = ledger.layout.n_shards

    def on_commit(w: Claim, m: ShardMarker) -> None:
        nonlocal done
        done += 1 if w.attempt == 0 else 0
        failed = ", ".join(f"{k} {v}" for k, v in m.status.items() if k != "ok")
        log.info("shard %d committed (%d/%d done): %d rows, %d ok%s, %.1f s", w.shard, done, n_shards,
                 m.rows, m.status.get("ok", 0), f", failed: {failed}" if failed else "", m.timings["wall_s"])

    workers = cfg.batch.preprocess_workers(cpu_count())
    with ShardWorker(cfg, plan.prompt.question, plan.prompt.template, ledger, plan.device, plan.dtype,
                     workers) as worker:
        progress = Progress(sum(w.images for w in work), cfg.quiet)
        try:
            return worker.run(work, progress, on_commit)
        finally:
            progress.close()
