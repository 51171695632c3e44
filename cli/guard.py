"""The contract every command keeps, whatever it does (docs/CLI.md, pipeline/errors.py):

- a user's mistake or an unusable input ends in ONE log line saying what and what to do, and the
  exit code the error carries (2 unless it says otherwise), never a traceback;
- Ctrl-C ends in an "interrupted" line and exit 130;
- SIGTERM (kill, Slurm's scancel, Kubernetes) is turned into the same orderly stop as Ctrl-C:
  worker pools shut down (no leaked semaphores), locks released, a "terminated" line, exit 143.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
from typing import Any, Callable

import typer

from pipeline.errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE
from pipeline.progress import setup_logging

log = logging.getLogger("pipeline")

# Exceptions that carry a one-line message meant for the user, by defining module. Looked up only
# among modules already imported: an error whose module was never imported cannot have been
# raised, and importing it here would load torch into `pipeline status`.
USER_ERRORS = {"pipeline.errors": "JobError", "models.loading": "CheckpointError",
               "pipeline.device": "DeviceError", "jobs.score": "ScoreError"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C so the same clean-up paths run."""


def _user_errors() -> tuple[type[BaseException], ...]:
    return tuple(getattr(sys.modules[m], name) for m, name in USER_ERRORS.items() if m in sys.modules)


def _on_sigterm(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)      # a second SIGTERM kills at once
    raise Terminated()


def guarded(command: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command with the one-line error contract (see the module docstring)."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        setup_logging()
        main = threading.current_thread() is threading.main_thread()      # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            return command(*args, **kwargs)
        except Terminated:
            log.error("terminated (SIGTERM); committed shards are kept, re-run the same command to resume")
            raise typer.Exit(EXIT_TERMINATED) from None
        except KeyboardInterrupt:
            log.error("interrupted; committed shards are kept, re-run the same command to resume")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except _user_errors() as e:
            log.error("%s", str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
            raise typer.Exit(getattr(e, "exit_code", EXIT_USAGE)) from None
        finally:
            if main:
                signal.signal(signal.SIGTERM, previous)

    return run


