"""Progress and logs: a tqdm bar for people at a terminal, log lines for cron and batch schedulers.

The bar shows images/s, new tokens/s, failures and the ETA; `--quiet` turns it off (and it is off
anyway when stderr is not a terminal). Each committed shard is also one INFO log line, so a job's
log file tells how it went without the bar. Logs go to stderr and to RUN_DIR/logs/.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from pathlib import Path

from tqdm import tqdm

from pipeline.records import Caption, Failed

log = logging.getLogger(__name__)

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


PACKAGES = ("pipeline", "jobs", "models", "stages", "cli")


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test runner may swap it per command)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def setup_logging(quiet: bool = False) -> None:
    """stderr logging for the whole process (idempotent: called per command). Our packages log at
    INFO (WARNING if quiet); other libraries only warnings (open_clip, Ray and transformers log
    their construction steps at INFO)."""
    root = logging.getLogger()
    if not any(isinstance(h, _Stderr) for h in root.handlers):
        h = _Stderr()
        h.setFormatter(logging.Formatter(FORMAT))
        root.addHandler(h)
    root.setLevel(logging.WARNING)
    for name in PACKAGES:
        logging.getLogger(name).setLevel(logging.WARNING if quiet else logging.INFO)


def add_log_file(folder: Path, command: str) -> logging.Handler | None:
    """One log file per invocation in RUN_DIR/logs (a read-only dir only loses the file, not the run)."""
    name = f"{command}-{time.strftime('%Y%m%d-%H%M%S')}-{socket.gethostname()}-{os.getpid()}.log"
    try:
        h = logging.FileHandler(folder / name, encoding="utf-8")
    except OSError as e:
        log.warning("cannot write a log file in %s: %s", folder, e)
        return None
    h.setFormatter(logging.Formatter(FORMAT))
    logging.getLogger().addHandler(h)
    return h


class Progress:
    def __init__(self, total: int, quiet: bool, desc: str = "caption"):
        # disable=None: tqdm turns itself off when stderr is not a terminal (cron, Slurm logs)
        self.bar = tqdm(total=total, desc=desc, unit="img", disable=True if quiet else None,
                        dynamic_ncols=True, smoothing=0.1)
        self.t0 = time.perf_counter()
        self.ok = 0
        self.failed = 0
        self.tokens = 0
        self._last = 0.0

    def record(self, rec: Caption | Failed) -> None:
        if isinstance(rec, Caption):
            self.ok += 1
            self.tokens += rec.n_new
        else:
            self.failed += 1
        self.bar.update(1)
        now = time.perf_counter()
        if now - self._last > 0.5:
            self._last = now
            dt = max(now - self.t0, 1e-9)
            self.bar.set_postfix(tok_s=f"{self.tokens / dt:.1f}", failed=self.failed, refresh=False)

    def close(self) -> None:
        self.bar.close()
