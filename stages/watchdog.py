"""A watchdog for device calls that never return (a hung GPU/NPU, a driver deadlock, an endless step).

The model stages run each device call (vision batch, prefill, decode step, cache resize) inside
`guard(what)`. A daemon thread checks the call in progress; one that has not returned after the
step timeout ends the process with exit code 1 (infrastructure) and one clear log line, after
dumping every thread's stack to stderr. Exiting is the only way out: a thread blocked in a
driver call cannot be interrupted, and a cron job must end rather than stall. Nothing is lost:
shards are committed atomically, so the shards in progress stay uncommitted, their locks go with
the process, and re-running the same command retries them.

The timeout is PIPELINE_STEP_TIMEOUT seconds (default 900; 0 disables). One step is one batch, so
the default leaves a wide margin over the slowest legitimate step (a full prefill group on a
small CPU takes well under a minute). The check runs on the watchdog's own thread every few
seconds; a step pays only two attribute writes.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from typing import Callable

from pipeline.errors import EXIT_INFRA

log = logging.getLogger(__name__)

ENV = "PIPELINE_STEP_TIMEOUT"
DEFAULT_TIMEOUT_S = 900.0
GRACE_S = 60.0              # the C-level fallback fires this long after the timeout


def timeout_from_env() -> float:
    raw = os.environ.get(ENV, "")
    try:
        return float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        log.warning("%s=%r is not a number of seconds; using %.0f", ENV, raw, DEFAULT_TIMEOUT_S)
        return DEFAULT_TIMEOUT_S


def exit_process(what: str, seconds: float) -> None:
    log.critical("%s has not returned after %.0f s (%s=%s): the device or driver is hung; exiting with code %d. "
                 "Shards in progress are not committed; re-run the same command to retry them.",
                 what, seconds, ENV, os.environ.get(ENV, f"{DEFAULT_TIMEOUT_S:.0f}"), EXIT_INFRA)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(EXIT_INFRA)


class Watchdog:
    def __init__(self, timeout_s: float, on_stall: Callable[[str, float], None] = exit_process):
        self.timeout_s = timeout_s
        self.on_stall = on_stall
        # A driver call that never releases the GIL would starve the watchdog thread too; then
        # faulthandler's C timer, which that thread keeps re-arming, dumps the stacks and exits
        # GRACE_S after the deadline. Only with the real exit (tests pass their own on_stall).
        self.hard_exit = on_stall is exit_process
        self._current: tuple[str, float] | None = None      # (what, monotonic start), swapped atomically
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def guard(self, what: str) -> "_Guard":
        """Run the body as one guarded call (two attribute writes: no cost per decode step)."""
        if self._thread is None and self.timeout_s > 0:
            self._start()
        return _Guard(self, what)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._arm()
                self._thread = threading.Thread(target=self._watch, name="step-watchdog", daemon=True)
                self._thread.start()

    def _arm(self) -> None:
        """Re-arm the C-level fallback: it fires only if this thread cannot run (the GIL is held)
        past the current call's deadline plus GRACE_S, or for timeout + GRACE_S when idle."""
        if self.hard_exit:
            current = self._current
            left = self.timeout_s if current is None else self.timeout_s - (time.monotonic() - current[1])
            faulthandler.dump_traceback_later(max(left, 0.0) + GRACE_S, exit=True)

    def _watch(self) -> None:
        poll = min(5.0, self.timeout_s / 4)
        while True:
            time.sleep(poll)
            self._arm()
            current = self._current
            if current is not None and time.monotonic() - current[1] > self.timeout_s:
                self.on_stall(current[0], time.monotonic() - current[1])
                if self._current is current:         # on_stall returned (tests): report each stall once
                    while self._current is current:
                        time.sleep(poll)


class _Guard:
    """Context manager of one guarded call (a class, not @contextmanager: a few times cheaper)."""

    __slots__ = ("dog", "what", "outer")

    def __init__(self, dog: Watchdog, what: str):
        self.dog, self.what = dog, what

    def __enter__(self) -> None:
        self.outer = self.dog._current
        if self.dog.timeout_s > 0:
            self.dog._current = (self.what, time.monotonic())

    def __exit__(self, *exc) -> None:
        self.dog._current = self.outer


_PROCESS: Watchdog | None = None


def guard(what: str):
    """The process-wide watchdog's guard (created on first use, timeout from the environment)."""
    global _PROCESS
    if _PROCESS is None:
        _PROCESS = Watchdog(timeout_from_env())
    return _PROCESS.guard(what)
