"""Fan work out over a Ray cluster: a pool of actors, each holding one model, fed one item at a time.

    driver ── queue of items ──> a ready actor ──> worker.process(item) ──> on_result(item, result)
                 ▲                    │ died (OOM, node lost): replaced (bounded), its item queued again
                 └── on_result may hand an item back with a delay (e.g. a shard locked by a dying process)

The driver owns the queue; actors pull nothing and know nothing of each other. Actors start one by
one (a model load each) and take work as soon as they are ready, so one slow or unschedulable actor
never holds an item hostage. An item's result is small (the worker has already written its output
itself), so a killed driver loses only the items in flight: the actors are not detached, Ray kills
them with their driver, and what they had not committed is simply not there on the next run.

This module knows Ray and nothing about models: the worker class and what an item is come from the
job (jobs/caption_ray.py). Ray is imported only here and only when --engine ray is asked for.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from pipeline.errors import EXIT_INFRA, JobError

log = logging.getLogger(__name__)

RAY_MISSING = "--engine ray needs Ray: pip install 'vlm-caption-pipeline[ray]' (on the driver and every node)"
MAX_ITEM_TRIES = 2          # an item whose actor dies twice is reported, not retried forever
WAIT_LOG_S = 30.0           # log when nothing has happened for this long (actors pending, long items)


def _ray():
    try:
        import ray
    except ImportError:
        raise JobError(RAY_MISSING) from None
    return ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` ('host:port', 'auto'; else $RAY_ADDRESS), or start a local
    instance for this run. A process that already joined one (a notebook, the tests) keeps it."""
    ray = _ray()
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")     # set by `ray job submit` for its entrypoint
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            # a throwaway single-machine cluster: no dashboard (memory, a port, seconds of startup)
            ray.init(include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"join the Ray cluster at {address}" if address else "start a local Ray instance"
        raise JobError(f"cannot {where}: {_first_line(e)}", EXIT_INFRA) from None
    live = nodes()
    log.info("ray %s: %s cluster at %s, %d node(s), %s", ray.__version__, "joined" if address else "local",
             ray.get_runtime_context().gcs_address, len(live), _fmt(total(live)))


def nodes() -> list[dict[str, float]]:
    """The total resources of each live node ({"CPU": 64.0, "GPU": 8.0, ...})."""
    return [dict(n["Resources"]) for n in _ray().nodes() if n.get("Alive")]


def total(per_node: list[dict[str, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for n in per_node:
        for k, v in n.items():
            out[k] = out.get(k, 0.0) + v
    return out


def demand(options: dict) -> dict[str, float]:
    """ray.remote options -> the resources one actor reserves, in the names nodes() reports."""
    out = {"CPU": float(options.get("num_cpus", 1)), "GPU": float(options.get("num_gpus", 0))}
    out.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return {k: v for k, v in out.items() if v > 0}


def capacity(per_node: list[dict[str, float]], need: dict[str, float]) -> int:
    """How many actors reserving `need` fit on the cluster at once (actors never span nodes)."""
    if not need:
        raise ValueError("an actor must reserve some resource")
    return sum(min(math.floor(n.get(k, 0.0) / v + 1e-9) for k, v in need.items()) for n in per_node)


def call_once(fn: Callable[..., Any], options: dict, *args: Any) -> Any:
    """fn(*args) as one Ray task with these resources, i.e. on a worker like the actors' own.
    An exception raised by fn is re-raised here as itself."""
    ray = _ray()
    ref = ray.remote(fn).options(**options).remote(*args)
    while not ray.wait([ref], timeout=WAIT_LOG_S)[0]:
        log.info("waiting for a worker with %s to become free", _fmt(demand(options)))
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        raise _cause(e) from None


class ModelActor:
    """The actor: hosts one worker object. A failed construction (bad model path on that node, out
    of device memory) is kept and raised by ready() as an ordinary task error, so the driver gets
    the real exception instead of an actor that died in its constructor."""

    def __init__(self, factory: Callable[..., Any], args: tuple):
        self.error: BaseException | None = None
        try:
            self.worker = factory(*args)
        except Exception as e:  # noqa: BLE001 - reported through ready()
            self.error = e

    def ready(self) -> str:
        if self.error is not None:
            raise self.error
        return str(getattr(self.worker, "where", "ready"))

    def process(self, item: Any) -> Any:
        return self.worker.process(item)


@dataclass
class _Entry:
    item: Any
    tries: int = 0


@dataclass(frozen=True)
class PoolReport:
    lost: tuple[tuple[Any, str], ...]       # (item, why) for items that could not be processed
    actors: int                             # actors that became ready
    replaced: int                           # actors that died and were replaced


def run_pool(factory: Callable[..., Any], args: tuple, options: dict, count: int, items: Iterable[Any],
             on_result: Callable[[Any, Any], float | None]) -> PoolReport:
    """Process every item on `count` actors, each holding factory(*args); calls on_result(item, result)
    in the driver as results arrive. on_result returns None when the item is settled, or a delay in
    seconds after which the item is handed out again. An exception that is a JobError stops the run
    (every actor is killed, the error is raised here); any other error loses only its item."""
    ray = _ray()
    actor_cls = ray.remote(ModelActor).options(**options, max_restarts=0)
    queue: deque[_Entry] = deque(_Entry(i) for i in items)
    later: list[tuple[float, int, _Entry]] = []            # (due, tie-breaker, entry)
    seq = itertools.count()
    starting: dict[Any, Any] = {}                           # ready() ref -> actor
    running: dict[Any, tuple[Any, _Entry]] = {}             # process() ref -> (actor, entry)
    idle: list[Any] = []
    every: list[Any] = []
    lost: list[tuple[Any, str]] = []
    start_errors: list[BaseException] = []
    ready_count = replaced = 0
    spare = count                                            # replacements allowed for dead actors

    def start_actor() -> None:
        actor = actor_cls.remote(factory, args)
        every.append(actor)
        starting[actor.ready.remote()] = actor

    def retry_or_lose(entry: _Entry, why: str) -> None:
        entry.tries += 1
        if entry.tries < MAX_ITEM_TRIES:
            queue.append(entry)
        else:
            lost.append((entry.item, why))

    for _ in range(count):
        start_actor()
    try:
        while queue or later or running:
            now = time.monotonic()
            while later and later[0][0] <= now:
                queue.append(heapq.heappop(later)[2])
            while idle and queue:
                actor, entry = idle.pop(), queue.popleft()
                running[actor.process.remote(entry.item)] = (actor, entry)
            if not running and not starting and not idle:
                why = f"no actor left ({_first_line(start_errors[-1])})" if start_errors else "no actor left"
                lost.extend((e.item, why) for e in [*queue, *(x[2] for x in later)])
                break
            timeout = max(0.0, later[0][0] - now) if later else WAIT_LOG_S
            refs = [*running, *starting]
            if not refs:                                      # only delayed items, actors idle
                time.sleep(timeout)
                continue
            done, _ = ray.wait(refs, num_returns=1, timeout=timeout)
            if not done and not later:
                log.info("waiting: %d item(s) running, %d actor(s) starting, %d queued",
                         len(running), len(starting), len(queue))
            for ref in done:
                if ref in starting:
                    actor = starting.pop(ref)
                    try:
                        where = ray.get(ref)
                    except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
                        cause = _cause(e)
                        start_errors.append(cause)
                        log.error("a Ray actor could not start: %s", _first_line(cause))
                        ray.kill(actor)              # not replaced: a failed start tends to repeat
                        continue
                    ready_count += 1
                    log.info("actor %d ready: %s", ready_count, where)
                    idle.append(actor)
                    continue
                actor, entry = running.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    log.warning("a Ray actor died (%s); its item goes to another actor", _first_line(e))
                    ray.kill(actor)
                    retry_or_lose(entry, f"actor died: {_first_line(e)}")
                    if spare > 0:
                        spare -= 1
                        replaced += 1
                        start_actor()
                    continue
                except ray.exceptions.RayTaskError as e:
                    cause = _cause(e)
                    if isinstance(cause, JobError):
                        raise cause from None
                    log.error("an item failed in its actor: %s", _first_line(cause))
                    lost.append((entry.item, f"{type(cause).__name__}: {_first_line(cause)}"))
                    idle.append(actor)
                    continue
                idle.append(actor)
                delay = on_result(entry.item, result)
                if delay is not None:
                    heapq.heappush(later, (time.monotonic() + delay, next(seq), entry))
    finally:
        # free the cluster now (not when the driver exits): the next run may need these resources
        for actor in every:
            ray.kill(actor)
    if ready_count == 0 and start_errors:
        first = start_errors[0]
        raise JobError(f"no Ray actor could start: {_first_line(first)}",
                       first.exit_code if isinstance(first, JobError) else EXIT_INFRA)
    return PoolReport(lost=tuple(lost), actors=ready_count, replaced=replaced)


def _cause(e: BaseException) -> BaseException:
    """The worker's own exception inside a Ray error (Ray re-raises it wrapped)."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, BaseException) else e


def _first_line(e: BaseException) -> str:
    """One line for a log or an error: for Ray's own errors (a traceback in the message), the
    exception line at its end ("ModuleNotFoundError: ..."), else the message's first line."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    if isinstance(e, JobError) or type(e).__module__.split(".")[0] != "ray":
        return lines[0]
    raised = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Interrupt|Exit): ", line)]
    return raised[-1] if raised else lines[0]


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k.isupper()}       # CPU, GPU, NPU; not memory, node:...
    return ", ".join(f"{k} {v:g}" for k, v in sorted(keep.items())) or "no resources"
