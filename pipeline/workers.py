"""An ordered, bounded, crash-isolating process pool for CPU-side stages.

- ordered: results come back in input order, so the consumer's stream is deterministic;
- bounded: at most `ahead` items are in flight, so a fast pool cannot fill memory while the
  model stage is slow (and a slow pool keeps the model fed `ahead` items in advance);
- crash-isolating: if a worker dies (a decoder segfault, the OOM killer) the pool is restarted
  and the items that were in flight are retried one at a time, so only the item that kills a
  worker again is reported failed (through `on_crash`) and its neighbours are unaffected;
- time-limited (optional): a worker that does not come back from one item is killed the same way
  and that item is reported through `on_timeout`.

Workers are spawned (not forked: the parent has torch threads and tokenizer state that do not
survive fork) and die with the parent (PR_SET_PDEATHSIG), so a SIGKILLed job leaves no orphans.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import os
import signal
from collections import deque
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, Iterable, Iterator, Protocol

log = logging.getLogger(__name__)

_FN: Callable[[Any], Any] | None = None


class Setup(Protocol):
    """A picklable object whose setup() returns the callable the workers apply."""

    def setup(self) -> Callable[[Any], Any]: ...


def _die_with_parent() -> None:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)          # PR_SET_PDEATHSIG
    except (OSError, AttributeError):          # not Linux: orphans exit when their pipe closes
        pass


def _init(factory: Setup, parent: int) -> None:
    global _FN
    _die_with_parent()
    if os.getppid() != parent:        # the parent died while this worker was still importing
        os._exit(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C is the parent's business
    try:
        import torch

        torch.set_num_threads(1)                       # one core per worker; the model gets the rest
    except ImportError:
        pass
    _FN = factory.setup()


def _apply(item: Any) -> Any:
    return _FN(item)


def _ping() -> int:
    return os.getpid()


class _Overran(Exception):
    """The item at the head of the queue ran past the hard time limit."""


class OrderedPool:
    """time_limit_s: a per-item limit enforced from outside. The stage should keep its own,
    softer limit (stages/time_limit.py raises inside Python code); this one catches what cannot
    be interrupted from inside (a decoder stuck in one C call): when the head item has not come
    back time_limit_s + grace_s after it became the head (it is then running: workers take items
    in order and every earlier one is back), the workers are killed and restarted like after a
    crash, and the item is reported through on_timeout."""

    def __init__(self, factory: Setup, workers: int, ahead: int, on_crash: Callable[[Any, str], Any],
                 time_limit_s: float | None = None, on_timeout: Callable[[Any, str], Any] | None = None,
                 grace_s: float = 30.0):
        self.factory = factory
        self.workers = workers
        self.ahead = max(1, ahead)
        self.on_crash = on_crash
        self.hard_limit_s = None if time_limit_s is None or workers <= 0 else time_limit_s + grace_s
        self.on_timeout = on_timeout or on_crash
        self.restarts = 0
        self._pool: cf.ProcessPoolExecutor | None = None
        self._inline: Callable[[Any], Any] | None = None
        self._pending: deque[tuple[Any, cf.Future]] = deque()
        self._ping: cf.Future | None = None

    def start(self) -> "OrderedPool":
        """Start the workers without waiting for them (their imports can overlap other set-up)."""
        if self.workers <= 0:
            self._inline = self.factory.setup()
            return self
        self._new_pool()
        return self

    def wait_ready(self) -> None:
        """Block until a worker has set up; a RuntimeError if they cannot (bad checkpoint, no memory)."""
        if self._inline is not None:
            return
        try:
            self._ping.result()
        except BrokenProcessPool as e:
            raise RuntimeError(f"preprocessing workers could not start ({e}); see the worker traceback above") from None

    def _new_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool = cf.ProcessPoolExecutor(max_workers=self.workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_init, initargs=(self.factory, os.getpid()))
        self._ping = self._pool.submit(_ping)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "OrderedPool":
        self.start().wait_ready()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def head_ready(self) -> bool:
        """Would the next result of map() come without waiting? (lets a consumer batch what is ready)"""
        return self._inline is not None or bool(self._pending and self._pending[0][1].done())

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        """One map at a time per pool. Closing the iterator early cancels what is still queued."""
        if self._inline is not None:
            for item in items:
                yield self._inline(item)
            return
        source = iter(items)
        pending = self._pending = deque()
        exhausted = False

        def fill() -> None:
            nonlocal exhausted
            while not exhausted and len(pending) < self.ahead:
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    return
                pending.append((item, self._pool.submit(_apply, item)))

        try:
            fill()
            while pending:
                item, fut = pending[0]
                try:
                    result = self._result(fut)
                except BrokenProcessPool:
                    yield from self._recover(pending)
                    fill()
                    continue
                except _Overran:
                    self._kill_workers()
                    pending.popleft()
                    yield self._overran(item)
                    yield from self._recover(pending, "the workers were killed after an item overran the time limit")
                    fill()
                    continue
                except Exception as e:  # noqa: BLE001 - the stage raised instead of returning a record
                    result = self.on_crash(item, f"{type(e).__name__}: {e}")
                pending.popleft()
                yield result
                fill()
        finally:
            for _, fut in pending:
                fut.cancel()
            pending.clear()

    def _result(self, fut: cf.Future) -> Any:
        """fut's result, waiting at most the hard limit (once the workers have started)."""
        if self.hard_limit_s is None:
            return fut.result()
        if self._ping is not None:
            self._ping.result()          # a worker's start-up (imports, checkpoint) is not the item's time
        try:
            return fut.result(timeout=self.hard_limit_s)
        except cf.TimeoutError:
            raise _Overran from None

    def _kill_workers(self) -> None:
        """SIGKILL every worker (which one runs the item is not known); the pool then breaks."""
        for proc in list(getattr(self._pool, "_processes", {}).values()):
            proc.kill()

    def _overran(self, item: Any) -> Any:
        return self.on_timeout(item, f"killed after {self.hard_limit_s:g} s: the preprocessing worker did not "
                                     "come back on this image")

    def _recover(self, pending: deque, why: str = "a preprocessing worker died") -> Iterator[Any]:
        """The pool died: keep finished results, retry the rest one by one in fresh pools."""
        self.restarts += 1
        log.warning("%s; retrying %d in-flight item(s) one at a time", why, len(pending))
        suspects = []
        for item, fut in pending:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                suspects.append((item, fut.result(), True))
            else:
                suspects.append((item, None, False))
        pending.clear()
        self._new_pool()
        for item, result, ok in suspects:
            if ok:
                yield result
                continue
            try:
                yield self._result(self._pool.submit(_apply, item))
            except BrokenProcessPool:
                self._new_pool()
                yield self.on_crash(item, "the preprocessing worker died on this image (crash or out of memory)")
            except _Overran:
                self._kill_workers()
                self._new_pool()
                yield self._overran(item)
            except Exception as e:  # noqa: BLE001
                yield self.on_crash(item, f"{type(e).__name__}: {e}")
