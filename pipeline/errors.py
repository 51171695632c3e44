"""The one exception type a job raises to stop with a one-line explanation, and the exit codes of
every `pipeline` command (docs/CLI.md documents the same codes; a test keeps the two equal)."""

from __future__ import annotations

EXIT_OK = 0             # complete; or nothing left for this process (other processes hold the rest)
EXIT_INFRA = 1          # a shard failed for infrastructure reasons (model, device, disk); re-run to retry
EXIT_USAGE = 2          # bad arguments or input, output not writable, fingerprint mismatch; nothing was done
EXIT_INTERRUPTED = 130  # Ctrl-C (SIGINT): committed shards are kept
EXIT_TERMINATED = 143   # SIGTERM: an orderly stop, committed shards are kept
EXIT_CODES = (EXIT_OK, EXIT_INFRA, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED)


class JobError(Exception):
    """A run cannot go on. str(e) is one line saying what happened and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
