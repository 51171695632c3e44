"""The `caption` job: manifest -> shards -> (preprocess pool -> encoder -> engine -> writer) -> run dir.

Order of work, cheapest checks first so a bad command fails in a second, not after a model load:
manifest, prompt/preset, device/dtype, fingerprint vs run.json, pending shards; then the model,
the worker pool and the streaming runner; last, captions.json once every shard is committed.
"""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Callable
from dataclasses import asdict, dataclass

from tqdm.contrib.logging import logging_redirect_tqdm

from pipeline import fingerprint as fp
from pipeline.config import DEFAULT_PROMPT, RunConfig
from pipeline.device import (DeviceError, cpu_count, cpu_kernels, describe, resolve_device, resolve_dtype,
                             set_threads)
from pipeline.errors import EXIT_INFRA, JobError
from pipeline.ledger import CAPTIONS_JSON, Layout, Ledger, ShardMarker
from pipeline.manifest import Manifest, read_manifest
from pipeline.progress import Progress, add_log_file
from pipeline.records import Failed
from pipeline.runner import Runner, RunSummary, ShardWork, Stages
from pipeline.schema import OutputSchema
from pipeline.workers import OrderedPool
from stages.preprocess import Preprocessor
from stages.write import ShardWriter, captions_mapping, read_shards

log = logging.getLogger(__name__)

ENCODE_BATCH = 8


@dataclass(frozen=True)
class Prompt:
    question: str
    template: str | None        # None: the family's default
    preset: str | None


def model_family(model_dir: str) -> str:
    """'bunny' | 'minicpmv2' ...: the family module's name, the vocabulary presets use."""
    from models.loading import CheckpointError
    from models.registry import FAMILIES, family_of

    try:
        return FAMILIES[family_of(model_dir)].rsplit(".", 1)[-1]
    except (CheckpointError, OSError) as e:
        raise JobError(f"--model {model_dir}: {e}") from None


def resolve_prompt(cfg: RunConfig, family: str) -> Prompt:
    preset = None
    if cfg.prompt_preset:
        try:
            from models.presets import get_preset
        except ImportError:
            raise JobError("--prompt-preset needs models/presets.py, which this installation lacks") from None
        try:
            preset = get_preset(cfg.prompt_preset, family)
        except ValueError as e:
            raise JobError(str(e)) from None
    question = cfg.prompt or (preset.question if preset else DEFAULT_PROMPT)
    return Prompt(question, preset.template if preset else None, preset.name if preset else None)


def default_workers() -> int:
    """Preprocessing processes: half the cores (the model stages use the rest), at most 8."""
    return max(1, min(8, cpu_count() // 2))


def plan_work(cfg: RunConfig, manifest: Manifest, ledger: Ledger) -> list[ShardWork]:
    """Pending shards of this slice, plus (with --retry-failed) the failed rows of committed ones."""
    work = [ShardWork(s, tuple(manifest.refs(s, cfg.shard_size))) for s in ledger.pending(cfg.array)]
    if cfg.retry_failed:
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        for s, m in sorted(ledger.markers().items()):
            if not cfg.array.owns(s) or m.failed == 0:
                continue
            table = pq.read_table(ledger.shards / m.file)
            ok = pc.equal(table.column("status"), "ok")
            redo = table.filter(pc.invert(ok)).column("index").to_pylist()
            work.append(ShardWork(s, tuple(manifest.ref(i, s) for i in redo), attempt=m.attempt + 1,
                                  keep=table.filter(ok)))
        work.sort(key=lambda w: w.shard)
    return work


def claim_shard(ledger: Ledger, w: ShardWork):
    """Lock the shard and re-check it is still to do; None = skip it (another process has it or did it)."""
    lock = ledger.try_lock(w.shard)
    if lock is None:
        log.info("shard %d is being worked on by another process; skipping it", w.shard)
        return None
    m = ledger.marker(w.shard)
    if m is not None and m.attempt >= w.attempt:      # committed meanwhile by another process
        lock.release()
        return None
    return lock


def _config_record(cfg: RunConfig, prompt: Prompt, device: str, dtype: str) -> dict:
    d = asdict(cfg)
    d["resolved"] = {"question": prompt.question, "template": prompt.template, "device": device, "dtype": dtype}
    return d


def run_caption(cfg: RunConfig) -> int:
    manifest = read_manifest(cfg.manifest)
    family = model_family(cfg.model)
    prompt = resolve_prompt(cfg, family)
    try:
        if cfg.engine == "ray":         # the models run on the cluster's workers: resolve there
            from jobs.caption_ray import resolve_on_cluster
            device, dtype = resolve_on_cluster(cfg)
        else:
            device = resolve_device(cfg.device)
            dtype = resolve_dtype(cfg.dtype, device)
    except DeviceError as e:
        raise JobError(str(e)) from None
    pre = Preprocessor(cfg.model, prompt.question, prompt.template, cfg.limits)
    front = _setup_frontend(pre)
    template_text = getattr(front.prompts, "template", None)
    dtype_name = str(dtype).removeprefix("torch.")
    finger = fp.make(fp.model_identity(cfg.model), family, prompt.question, template_text,
                     prompt.preset, asdict(cfg.decode), dtype_name)
    layout = Layout(manifest.digest, len(manifest), cfg.shard_size)
    ledger = Ledger(cfg.out)
    ledger.open(finger, layout, _config_record(cfg, prompt, str(device), dtype_name), cfg.overwrite, cfg.array)
    handler = add_log_file(ledger.logs, "caption")
    try:
        if cfg.engine == "ray":
            from jobs.caption_ray import run_ray
            return run_ray(cfg, manifest, ledger, device, dtype, prompt)
        return _run(cfg, manifest, ledger, pre, front, device, dtype, prompt)
    finally:
        if handler is not None:
            logging.getLogger().removeHandler(handler)
            handler.close()


def _setup_frontend(pre: Preprocessor) -> Preprocessor:
    """The processor + prompt builder in this process: a broken checkpoint fails here, in one line."""
    from models.loading import CheckpointError

    front = Preprocessor(pre.model_dir, pre.question, pre.template, pre.limits)
    try:
        return front.setup()
    except (CheckpointError, ValueError, OSError) as e:
        raise JobError(f"--model {pre.model_dir}: {e}") from None


def _run(cfg: RunConfig, manifest: Manifest, ledger: Ledger, pre: Preprocessor, front: Preprocessor,
         device, dtype, prompt: Prompt) -> int:
    ledger.remove_stale_temp(cfg.array)
    work = plan_work(cfg, manifest, ledger)
    n_shards = ledger.layout.n_shards
    log.info("run %s: %d images in %d shards of %d; this process: %d shard(s) to do%s",
             ledger.root, len(manifest), n_shards, cfg.shard_size, len(work),
             f" (array task {cfg.array.index}/{cfg.array.total})" if cfg.array.total > 1 else "")
    if not work:
        finish(ledger)
        return 0
    set_threads(cfg.threads)
    workers = default_workers() if cfg.workers is None else cfg.workers
    # workers == 0: preprocess inline with the frontend already built in this process
    pool = preprocess_pool(pre if workers else _Ready(front), workers)
    pool.start()              # spawns now: the workers' start-up (imports, tokenizer) overlaps the model load
    try:
        return _stream(cfg, manifest, ledger, pool, work, device, dtype)
    finally:
        pool.close()


@dataclass
class ModelStages:
    """The model-side stages of a process (local run or Ray actor): built once, used per shard."""

    loaded: object            # models.base.LoadedModel
    writer: ShardWriter
    encoder: object           # stages.encode.VisionEncoder
    make_engine: Callable[[], object]
    load_s: float


def build_model_stages(cfg: RunConfig, ledger: Ledger, extra_types: dict, device, dtype) -> ModelStages:
    """Load the model (with the device's fast paths) and build encoder, engine factory and writer."""
    from models.registry import load_model
    from stages.caption.engine import CaptionEngine, EngineOptions
    from stages.encode import VisionEncoder

    t0 = time.perf_counter()
    loaded = load_model(cfg.model, dtype, device, kernels=cpu_kernels(device, dtype))
    options = EngineOptions(max_batch_size=cfg.max_batch_size, memory_budget_gib=cfg.memory_budget_gib)
    return ModelStages(loaded=loaded,
                       writer=ShardWriter(ledger, OutputSchema(extra_types, loaded.name, ledger.fingerprint)),
                       encoder=VisionEncoder(loaded), make_engine=partial(CaptionEngine, loaded, cfg.decode, options),
                       load_s=time.perf_counter() - t0)


def preprocess_pool(pre, workers: int) -> OrderedPool:
    """The ordered preprocessing pool both engines use (0 workers: `pre` is set up inline)."""
    return OrderedPool(pre, workers, ahead=max(2 * ENCODE_BATCH, 4 * workers),
                       on_crash=lambda ref, msg: Failed(ref, "preprocess", "worker_crashed", msg),
                       time_limit_s=pre.limits.max_seconds if workers else None,
                       on_timeout=lambda ref, msg: Failed(ref, "preprocess", "timeout", msg))


def _stream(cfg: RunConfig, manifest: Manifest, ledger: Ledger, pool: OrderedPool, work: list[ShardWork],
            device, dtype) -> int:
    ms = build_model_stages(cfg, ledger, manifest.extra_types, device, dtype)
    loaded, writer, encoder = ms.loaded, ms.writer, ms.encoder
    log.info("model %s (%s) loaded on %s as %s in %.1f s; %s", loaded.name, loaded.family, describe(device),
             str(dtype).removeprefix("torch."), ms.load_s, loaded.kernels)
    try:
        pool.wait_ready()
    except RuntimeError as e:
        raise JobError(str(e), EXIT_INFRA) from None
    n_shards = ledger.layout.n_shards
    done_before = len(ledger.markers())

    def claim(w: ShardWork):
        return claim_shard(ledger, w)

    def commit(w: ShardWork, records, started: float) -> None:
        nonlocal done_before
        m: ShardMarker = writer.commit(w, records, started)
        done_before += 1 if w.attempt == 0 else 0
        failed = ", ".join(f"{k} {v}" for k, v in m.status.items() if k != "ok")
        log.info("shard %d committed (%d/%d done): %d rows, %d ok%s, %.1f s", w.shard, done_before, n_shards,
                 m.rows, m.status.get("ok", 0), f", failed: {failed}" if failed else "", m.timings["wall_s"])

    progress = Progress(sum(len(w.refs) for w in work), cfg.quiet)
    stages = Stages(pool=pool, encode=encoder, make_engine=ms.make_engine,
                    claim=claim, release=lambda lock: lock.release(), commit=commit, progress=progress,
                    encode_batch=ENCODE_BATCH)
    try:
        with logging_redirect_tqdm():
            summary = Runner(stages).run(work)
    finally:
        progress.close()
    return report_end(summary, ledger)


def report_end(summary: RunSummary, ledger: Ledger) -> int:
    """Log the summary, write captions.json if the run is complete, and choose the exit code."""
    log_summary(summary)
    complete = finish(ledger)
    if summary.failed or summary.not_started:
        shards = [s for s, _ in summary.failed] + list(summary.not_started)
        log.error("%d shard(s) not committed (%s); re-run the same command to retry them",
                  len(shards), ", ".join(map(str, shards[:10])) + (" ..." if len(shards) > 10 else ""))
        return EXIT_INFRA
    if not complete and summary.busy:
        log.info("%d shard(s) are being captioned by other processes", len(summary.busy))
    return 0


@dataclass(frozen=True)
class _Ready:
    """A Setup whose callable already exists (inline preprocessing in this process)."""

    pre: Preprocessor

    def setup(self) -> Preprocessor:
        return self.pre


def log_summary(s: RunSummary) -> None:
    failed = {k: v for k, v in s.status.items() if k != "ok"}
    wall = max(s.wall_s, 1e-9)
    share = {k: v / wall for k, v in s.stages.items()}
    log.info("captioned %d images (%d ok, %d failed%s) in %.1f s: %.2f img/s, %.1f new tok/s",
             s.images, s.status.get("ok", 0), sum(failed.values()),
             (": " + ", ".join(f"{k} {v}" for k, v in sorted(failed.items()))) if failed else "",
             s.wall_s, s.images / wall, s.new_tokens / wall)
    log.info("model busy %.0f%% of wall time (encode %.0f%%, caption %.0f%%); waiting for preprocessing %.0f%%, "
             "writing %.0f%%", 100 * s.model_busy_share, 100 * share.get("encode", 0), 100 * share.get("caption", 0),
             100 * share.get("preprocess_wait", 0), 100 * share.get("write", 0))


def finish(ledger: Ledger) -> bool:
    """Write captions.json if every shard of the run is committed (by any process). True if so."""
    markers = ledger.markers()
    n = ledger.layout.n_shards
    if len(markers) < n:
        log.info("%d of %d shards committed; captions.json is written when all are", len(markers), n)
        return False
    path = ledger.root / CAPTIONS_JSON
    newest = max(ledger.marker_path(s).stat().st_mtime_ns for s in markers)
    if path.exists() and path.stat().st_mtime_ns > newest:
        # a no-op re-run (hourly cron on a finished run) must not re-read millions of rows
        log.info("run complete; %s is up to date", path)
        return True
    captions = captions_mapping(read_shards(ledger, markers))
    ledger.write_captions(captions)
    log.info("run complete: %d captions in %s", len(captions), path)
    return True

