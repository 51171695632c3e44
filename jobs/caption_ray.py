"""`pipeline caption --engine ray`: the pending shards fanned out over Ray actors
(pipeline/distribute.py), each holding one ShardWorker (jobs/shard_worker.py).

The driver (this process) plans exactly like a local run (jobs/plan.py: checks, run.json, the
pending shards) and never loads the model. Each actor builds the same ShardWorker the local loop
uses and runs one shard per call, so a shard is claimed (flock), written (temp file, fsync,
rename) and marked done exactly as in a local run, by the process that captioned it. That is what
makes the engines interchangeable on one run dir: a local run resumes a Ray run and a Ray run
resumes a local one, with the same command.

Every node must see the run dir, the model folder and the images at the same paths (shared storage;
docs/SCALING.md); the actors check the first two and one image before they take work.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from jobs.plan import RunPlan
from jobs.shard_worker import ShardWorker, combine
from models.base import dtype_name
from pipeline import distribute
from pipeline import fingerprint as fp
from pipeline.config import RunConfig
from pipeline.device import (DTYPES, cluster_device_kind, device_kind, ray_actor_options, resolve_device,
                             resolve_dtype, set_threads)
from pipeline.errors import JobError
from pipeline.ledger import Ledger
from pipeline.index import ManifestIndex
from pipeline.sources import locator as L
from pipeline.progress import Progress, add_log_file, setup_logging
from pipeline.runner import RunSummary, ShardWork

log = logging.getLogger(__name__)

BUSY_RETRY_S = 2.0       # a shard locked by another process is offered again after this long...
BUSY_RETRIES = 5         # ...this many times: a killed run's actors release their locks within a second


@dataclass(frozen=True)
class ActorPlan:
    kind: str                   # cpu | cuda | npu
    cpus: int                   # CPUs each actor reserves (torch threads too, on cpu)
    workers: int                # preprocessing processes per actor
    options: dict = field(hash=False)     # ray.remote options: the accelerator and the CPUs


def plan_actors(cfg: RunConfig, kind: str, per_node: list[dict[str, float]]) -> ActorPlan:
    """CPUs and preprocessing workers per actor. cpu: one actor per node by default (torch uses every
    core it is given), --threads N for several smaller ones. GPU/NPU: one accelerator each plus
    1 + workers CPUs, but never more than the CPU-per-accelerator ratio of the nodes, so a CPU
    reservation can never leave an accelerator idle."""
    if kind == "cpu":
        cpus = cfg.threads or max(1, int(min((n.get("CPU", 0.0) for n in per_node if n.get("CPU", 0.0) >= 1),
                                             default=1)))
        return ActorPlan(kind, cpus, cfg.batch.preprocess_workers(cpus), ray_actor_options(kind, cpus))
    workers = cfg.batch.preprocess_workers(0, accelerator=True)
    accel = next(k for k in distribute.demand(ray_actor_options(kind, 1)) if k != "CPU")
    ratios = [n.get("CPU", 0.0) / n[accel] for n in per_node if n.get(accel, 0.0) >= 1]
    cpus = max(1, min(1 + workers, int(min(ratios, default=1))))
    return ActorPlan(kind, cpus, workers, ray_actor_options(kind, cpus))


def fitting_plan(cfg: RunConfig, kind: str, per_node: list[dict[str, float]]) -> tuple[ActorPlan, int]:
    """The actor plan and how many such actors the cluster holds at once; none is an error (a task
    asking for more than any node has would wait forever)."""
    plan = plan_actors(cfg, kind, per_node)
    need = distribute.demand(plan.options)
    fits = distribute.capacity(per_node, need)
    if fits == 0:
        raise JobError(f"no Ray node can hold one model actor ({', '.join(f'{k} {v:g}' for k, v in need.items())}); "
                       f"lower --threads or --workers, or add nodes")
    return plan, fits


@dataclass(frozen=True)
class RemoteDevice:
    """The actors' device as the driver records it (torch.device("npu") would need torch_npu here,
    on what may be a CPU-only head node)."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


def _probe(kind: str, dtype_spec: str) -> tuple[str, str]:
    """On a worker like the actors': the device it gets and the dtype 'auto' means there."""
    device = resolve_device(kind)
    return str(device), dtype_name(resolve_dtype(dtype_spec, device))


def resolve_on_cluster(cfg: RunConfig) -> tuple[RemoteDevice, torch.dtype]:
    """Join/start Ray and resolve --device/--dtype where the models will run (the driver may be a
    CPU-only head node). Raises DeviceError like resolve_device() does."""
    distribute.connect(cfg.ray_address)
    per_node = distribute.nodes()
    kind = cluster_device_kind(cfg.device, distribute.total(per_node))
    if kind != "cpu" and device_kind(cfg.device) and ":" in cfg.device:
        log.warning("--device %s: the index is ignored with --engine ray (each actor gets one whole device)",
                    cfg.device)
    plan, _ = fitting_plan(cfg, kind, per_node)
    device, dtype = distribute.call_once(_probe, plan.options, kind, cfg.dtype)
    log.info("ray: models run on %s as %s", kind, dtype)
    dev_type, _, index = device.partition(":")
    return RemoteDevice(dev_type, int(index) if index else None), DTYPES[dtype]


class ActorWorker:
    """Inside a Ray actor: checks that this node sees the run's inputs, then holds one ShardWorker
    and runs one shard per call."""

    def __init__(self, cfg: RunConfig, question: str, template: str | None, kind: str, dtype_spec: str,
                 plan: ActorPlan, sample_image: str | None):
        setup_logging()
        host = socket.gethostname()
        ledger = Ledger(cfg.out)
        try:
            ledger.read_run()
        except JobError as e:
            raise JobError(f"on node {host}: {e}; the run dir must be on storage every Ray node mounts "
                           f"at the same path") from None
        add_log_file(ledger.logs, "caption-actor")
        _check_same_inputs(cfg.model, ledger.run.fingerprint_parts, sample_image, host)
        device = resolve_device(kind)
        set_threads(cfg.threads or (plan.cpus if device.type == "cpu" else None))
        # the worker (its pool included) lives as long as the actor: processes spawned once, not per shard
        self.worker = ShardWorker(cfg, question, template, ledger, device, resolve_dtype(dtype_spec, device),
                                  plan.workers)
        self.where = f"{host} pid {os.getpid()}, {self.worker.where}, model loaded in {self.worker.load_s:.1f} s"

    def process(self, work: ShardWork) -> RunSummary:
        """Claim, caption and commit one shard: the local engine's code path, one shard per call."""
        return self.worker.run([work], Progress(work.images, quiet=True))


def _check_same_inputs(model: str, parts: dict, sample_image: str | None, host: str) -> None:
    """A node that sees a different checkpoint (or none) at the model path, or not the images, would
    write wrong or all-'missing' shards under this run's fingerprint: refuse to start instead."""
    try:
        files = fp.model_identity(model)
    except OSError as e:
        files = {"<error>": str(e)}
    if files != parts.get("model_files"):
        raise JobError(f"on node {host}: the model folder {model} is missing or holds different files than "
                       f"where the run was started; every node needs the same checkpoint at the same path")
    if sample_image is not None and not os.path.exists(sample_image):
        raise JobError(f"on node {host}: image {sample_image} is not there; every node needs the images at "
                       f"the same paths (shared storage)")


def _sample_image(index: ManifestIndex) -> str | None:
    """A local file the driver can see among the input's first 20 rows (an image, or the tar shard
    or Parquet file holding it), for the actors to check that they see it too. URLs need no check."""
    for ref in index.refs(0)[:20]:
        try:
            loc = L.parse(ref.resolved) if not L.is_local(ref.resolved) else L.FileLocator(ref.resolved)
        except ValueError:
            continue
        path = loc.path if isinstance(loc, L.FileLocator) else getattr(loc, "file", None)
        if path is not None and os.path.exists(path):
            return path
    return None


def run_ray(run: RunPlan, work: list[ShardWork]) -> RunSummary:
    """The shards on Ray actors; the summary of what they did."""
    cfg, ledger, device = run.cfg, run.ledger, run.device
    n_shards = ledger.layout.n_shards
    plan, fits = fitting_plan(cfg, device.type, distribute.nodes())
    count = min(cfg.ray_actors or fits, len(work))
    if cfg.ray_actors and cfg.ray_actors > fits:
        log.warning("--ray-actors %d: the cluster holds %d at once now; the others start when resources free up",
                    cfg.ray_actors, fits)
    log.info("ray: %d actor(s), each one model on %s with %d CPU(s) and %d preprocessing worker(s)",
             count, plan.kind, plan.cpus, plan.workers)

    results: list[RunSummary] = []
    busy_tries: dict[int, int] = defaultdict(int)
    gave_up: list[int] = []
    done = len(ledger.marked())
    bar = tqdm(total=sum(w.images for w in work), desc="caption", unit="img", dynamic_ncols=True,
               disable=True if cfg.quiet else None)

    def on_result(w: ShardWork, s: RunSummary) -> float | None:
        nonlocal done
        results.append(replace(s, busy=()))                # busy shards are offered again below
        bar.update(s.images)
        if w.shard in s.committed:
            done += 1 if w.attempt == 0 else 0
            log.info("shard %d committed (%d/%d done): %d images, %s, %.1f s", w.shard, done, n_shards, s.images,
                     ", ".join(f"{k} {v}" for k, v in sorted(s.status.items())), s.wall_s)
        if w.shard not in s.busy:
            return None
        m = ledger.marker(w.shard)
        if m is not None and m.attempt >= w.attempt:
            return None                                    # committed meanwhile by another process
        busy_tries[w.shard] += 1
        if busy_tries[w.shard] <= BUSY_RETRIES:
            log.info("shard %d is locked by another process (perhaps an actor of a killed run, exiting); "
                     "offering it again in %.0f s", w.shard, BUSY_RETRY_S)
            return BUSY_RETRY_S
        gave_up.append(w.shard)
        return None

    t0 = time.perf_counter()
    args = (cfg, run.prompt.question, run.prompt.template, plan.kind, dtype_name(run.dtype), plan,
            _sample_image(run.index))
    try:
        with logging_redirect_tqdm():                      # log lines above the bar, not through it
            report = distribute.run_pool(ActorWorker, args, plan.options, count, work, on_result)
    finally:
        bar.close()
    lost = RunSummary(committed=(), failed=tuple((w.shard, why) for w, why in report.lost), busy=tuple(gave_up),
                      not_started=(), images=0, status={}, new_tokens=0, wall_s=0.0, stages={})
    return combine([*results, lost], time.perf_counter() - t0, workers=report.actors)
