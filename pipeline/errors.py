"""The one exception type a job raises to stop with a one-line explanation and an exit code."""

from __future__ import annotations

# Exit codes of `pipeline caption` (docs/CLI.md): 0 complete; these otherwise.
EXIT_INFRA = 1      # a shard failed for infrastructure reasons (model, device, disk); re-run to retry
EXIT_USAGE = 2      # bad arguments, unreadable manifest, output not writable, fingerprint mismatch


class JobError(Exception):
    """A run cannot go on. str(e) is one line saying what happened and what to do."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE):
        super().__init__(message)
        self.exit_code = exit_code
