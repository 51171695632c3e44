"""A run's input: resolved, indexed once per run dir, and checked against run.json by every later
process. Torch-free (the caption planner and `pipeline plan` both use it).

    spec   = input_spec(cfg)                              what --manifest / --input names
    index  = open_index(ledger, spec, shard_size, overwrite)   RUN_DIR/index.parquet, current for spec
    layout = layout_of(index)                             what run.json records about the input

The index is built ONCE per run dir: the first process builds it under RUN_DIR/locks/index.lock,
processes that start at the same time (an array job's tasks) wait for that lock and then find it
current. Every later process (an array task, a resume) validates it against the input cheaply
(the index's footer and one stat per input file; the raw-bytes digest only when a stat differs,
pipeline/index/read.check_index) and never parses the manifest again.

run.json's `layout.input` is the input's identity (raw-bytes digests + parse options,
pipeline/index/identity.py). When the input no longer has that identity the run is refused, before
anything is built or written, with what changed: the manifest's bytes, one tar shard or Parquet
file, the files listed, the kind of input or a reading option. An index that is stale for a
harmless reason (the manifest was touched or moved with the same bytes) is rebuilt.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

from pipeline.config import RunConfig
from pipeline.errors import JobError
from pipeline.index import InputOptions, InputSpec, ManifestIndex, build_index, check_index, current_parts, resolve_input
from pipeline.index import identity as ident
from pipeline.index.read import read_meta
from pipeline.ledger import Layout, Ledger, RunDoc, different_run

log = logging.getLogger(__name__)

# InputOptions field -> the option that sets it, for messages
OPTION_FLAGS = {"image_column": "--image-column", "key_column": "--key-column", "max_bytes": "--max-image-bytes"}


def input_options(cfg: RunConfig) -> InputOptions:
    return InputOptions(image_column=cfg.source.image_column, key_column=cfg.source.key_column,
                        max_bytes=cfg.fetch.max_bytes)


def input_spec(cfg: RunConfig) -> InputSpec:
    """What --manifest / --input names (a one-line JobError when it is none of the supported inputs)."""
    return resolve_input(cfg.manifest, input_options(cfg))


def layout_of(index: ManifestIndex) -> Layout:
    return Layout(index.identity, len(index), index.shard_size)


def describe(kind: str, fmt: str, n_files: int) -> str:
    """'a txt manifest', '12 tar shards', '3 Parquet files with image bytes'."""
    if kind == "manifest":
        return f"a {fmt} manifest"
    what = "tar shard" if kind == "tar" else "Parquet file"
    tail = "" if kind == "tar" else " with image bytes"
    return f"{n_files} {what}{'s' if n_files != 1 else ''}{tail}"


def what_changed(old: dict[str, Any] | None, spec: InputSpec, parts: list[str]) -> str:
    """One phrase naming how the input differs from the one the run was made from. `old` is the
    record of the run's index (None when it is gone: then only "changed" can be said)."""
    if old is None:
        return "the input changed since the run started (its index is gone, so what changed cannot be named)"
    old_files = [s["file"] for s in old.get("stats", [])]
    new_files = ([spec.manifest] if spec.manifest else []) + [spec.resolve(g) for g in spec.files]
    if (old.get("kind"), old.get("format")) != (spec.kind, spec.format):
        n_old = len(old_files) - (1 if old.get("manifest") else 0)
        return (f"the run's input was {describe(old.get('kind', '?'), old.get('format', '?'), n_old)}, "
                f"now {describe(spec.kind, spec.format, len(spec.files))}")
    opts_old = (old.get("options") or {}).get("options", {})
    opts_new = ident.options_record(spec)["options"]
    for k in opts_new:
        if opts_old.get(k) != opts_new[k]:
            return f"{OPTION_FLAGS.get(k, k)} was {opts_old.get(k)!r}, now {opts_new[k]!r}"
    old_parts = old.get("parts") or []
    if spec.manifest and old.get("manifest") != spec.manifest:
        return f"the run's input was {old.get('manifest')}, now {spec.manifest}"
    if not spec.manifest and old.get("given") != spec.given:
        return f"the input was {old.get('given')!r}, now {spec.given!r}"
    if old_parts[:1] != parts[:1] and spec.manifest:
        return f"the manifest {spec.manifest} changed since the run started (its bytes differ)"
    if old_files != new_files:
        return f"the input lists other files ({len(old_files)} then, {len(new_files)} now)"
    for f, a, b in zip(new_files[1 if spec.manifest else 0:], old_parts[1:], parts[1:]):
        if a != b:
            return f"{f} changed since the run started"
    return "the input's content changed since the run started"


def _old_meta(ledger: Ledger) -> dict[str, Any] | None:
    try:
        return read_meta(ledger.index)
    except Exception:  # noqa: BLE001 - a missing or damaged index: nothing to compare with
        return None


def _undo_created(ledger: Ledger) -> None:
    """A build that failed in a run dir this process created leaves nothing behind (only empty
    folders and the lock file can be there; a folder that is not empty stays)."""
    for remove, p in ((os.unlink, ledger.locks / "index.lock"), (os.rmdir, ledger.locks), (os.rmdir, ledger.root)):
        try:
            remove(p)
        except OSError:
            pass


def open_index(ledger: Ledger, spec: InputSpec, shard_size: int, overwrite: bool) -> ManifestIndex:
    """The run dir's index of `spec`, built if there is none or it is stale. Refuses (JobError)
    when the run dir's run.json was made from another input or shard size, unless overwrite."""
    if check_index(ledger.index, spec, shard_size) is None:
        return ManifestIndex(ledger.index)          # the common case: no lock, no hashing, no parsing
    created = not ledger.root.exists()
    try:
        with ledger.index_lock():
            stale = check_index(ledger.index, spec, shard_size)
            if stale is None:                                             # built while this process waited
                return ManifestIndex(ledger.index)
            run = ledger.peek_run()
            if run is not None and not overwrite:
                _same_input_or_refuse(ledger, run, spec, shard_size)
                log.info("the input's index in %s is out of date (%s); rebuilding it", ledger.root, stale)
            t0, c0 = time.perf_counter(), time.process_time()
            info = build_index(spec, ledger.index, shard_size)
            log.info("indexed %s: %d images in %d shard(s) of %d (%.1f s, %.1f s CPU)", spec.given, info.n_rows,
                     info.n_shards, shard_size, time.perf_counter() - t0, time.process_time() - c0)
            return ManifestIndex(ledger.index)
    except JobError:
        if created:
            _undo_created(ledger)
        raise


def _same_input_or_refuse(ledger: Ledger, run: RunDoc, spec: InputSpec, shard_size: int) -> None:
    """The index is stale or gone but the run exists: rebuilding is right only if the input still
    has the run's identity (touched, moved with its images, index deleted)."""
    if run.layout.shard_size != shard_size:
        raise different_run(ledger.root, f"its shard size was {run.layout.shard_size}, now {shard_size}")
    parts = current_parts(spec)
    if ident.combine(spec, parts) != run.layout.input:
        raise different_run(ledger.root, what_changed(_old_meta(ledger), spec, parts))
