"""The error path: image refs that cannot be opened become rows before the preprocessing pool.

A shard's refs are screened once, when it is claimed: local paths are stat'ed in batches
(pipeline/sources/local.py: a few threads, so a network filesystem's round trips overlap) and
refs the input listing already rejected (a hostile tar member, a missing shard) are decoded from
their locator. Those rows are made here, in the main process, with the very status and message
the preprocessing stage would give (the rules are shared), so a manifest of missing files costs a
stat per row, not a process round trip per row. Everything else (files that exist, URLs, tar
members, Parquet cells) goes to the pool, where the real opener decides.
"""

from __future__ import annotations

from pipeline.records import Failed, ImageRef
from pipeline.sources import locator as L
from pipeline.sources.local import stat_errors


def screen(refs: tuple[ImageRef, ...] | list[ImageRef]) -> tuple[list[Failed], list[ImageRef]]:
    """(rows for the refs that cannot be opened, the refs to preprocess), each in input order."""
    failed: list[Failed] = []
    rest: list[ImageRef] = []
    local = [r for r in refs if r.resolved.startswith("/") or L.is_local(r.resolved)]
    errors = dict(zip((r.index for r in local), stat_errors([r.resolved for r in local])))
    for r in refs:
        err = errors.get(r.index)
        if err is None and r.resolved.startswith("rejected:"):
            try:
                loc = L.parse(r.resolved)
                err = L.SourceError(loc.status, loc.message)
            except ValueError:
                err = None                     # malformed: the opener reports it as a row
        if err is None:
            rest.append(r)
        else:
            failed.append(Failed(r, "preprocess", err.status, str(err)))
    return failed, rest
