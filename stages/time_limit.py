"""A wall-clock limit on a block of Python code, from a SIGALRM timer.

Used per image in preprocessing: decoders, resizes and the prompt builder run in the worker's
main thread and return to the interpreter between blocks of work (Pillow feeds its decoders 64 KB
at a time), so the signal handler gets to raise inside them. What never returns to the
interpreter (a decoder stuck inside one C call) is the pool's business: pipeline/workers.py kills
a worker that overruns the limit by far.

The exception derives from BaseException so that no `except Exception` on the way (Pillow's, or
our opener's "any decoder error is `corrupt`") can swallow it.
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from typing import Iterator


class TimeLimitExceeded(BaseException):
    """The block ran past its limit (raised inside it, wherever it was)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise TimeLimitExceeded in this block after `seconds`. A no-op (the block runs unlimited)
    when seconds is None, off the main thread (signals only reach it), or when a timer that
    fires sooner is already set (e.g. pytest-timeout's): that one is left alone."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    outer = signal.getitimer(signal.ITIMER_REAL)
    if 0 < outer[0] <= seconds:
        yield
        return

    def expire(signum, frame):
        raise TimeLimitExceeded(f"over {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    # Nested so that the handler is put back even when the (one-shot) timer fires in the instant
    # between the block's end and the disarm: it can fire once, and only before the disarm.
    try:
        try:
            signal.setitimer(signal.ITIMER_REAL, seconds)
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        if outer[0] > 0:                # give an outer timer back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer[0] - (time.monotonic() - start), 1e-3), outer[1])
