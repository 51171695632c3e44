"""Build the manifest index: one streamed pass over the input, written as shard-aligned Parquet.

Columns: `key`, `path` (as the input wrote it), the locator columns of the input's kind (see
LOCATOR_COLUMNS), then the passthrough columns as `extra:<name>` with their types. Row groups are
aligned to shards: row group g holds exactly shards g*G .. g*G+G-1 (G = group_shards(shard_size),
about GROUP_ROWS rows), so a task reads only the row groups of its own shards. One row group per
shard would be exact, but 39,063 row groups make a 4 MiB footer that costs ~80 MB to parse in
every process; G shards per group keep the footer ~40x smaller for reads of ~8k rows per claimed
shard. The build record (kind, root, files, identity, shard size, G, counts) is JSON in the file's
key-value metadata under `pipeline.index`.

Duplicates are found with a hashed check: each key's 64-bit hash goes into one int64 array
(80 MB at 10M rows, never a set of strings); only keys whose hashes collide are read back and
compared exactly. Paths keyed by themselves that repeat are dropped (later occurrences, as
pipeline/manifest.py does); a repeated id or sample key is an error. The same check over resolved
paths counts entries naming an already listed file (`same_file`, a warning). The file is written
under a temporary name and renamed into place, so a crash never leaves half an index.
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import JobError
from pipeline.index import identity as ident
from pipeline.index.formats import Duplicate, py_whitespace, warn_duplicates
from pipeline.index.inputs import InputSpec
from pipeline.ledger import atomic_write
from pipeline.index.parse import EntryBatch, ids_as_text, read_csv, read_jsonl, read_parquet, read_txt
from pipeline.sources.locator import URL_RE
from pipeline.sources.parquet_bytes import layout
from pipeline.sources.tar import scan_tar

log = logging.getLogger(__name__)

META_KEY = b"pipeline.index"
EXTRA = "extra:"
GROUP_ROWS = 8192               # index rows per row group, in whole shards
LOCATOR_COLUMNS: dict[str, list[pa.Field]] = {
    "manifest": [],                                   # the locator is the path, resolved when a shard runs
    "tar": [pa.field("source", pa.int32()), pa.field("member", pa.string()), pa.field("offset", pa.int64()),
            pa.field("size", pa.int64()), pa.field("status", pa.string()), pa.field("message", pa.string())],
    "parquet_bytes": [pa.field("source", pa.int32()), pa.field("row_group", pa.int32()), pa.field("row", pa.int32()),
                      pa.field("status", pa.string()), pa.field("message", pa.string())],
}
_UNCLEAN = r"(^|/)\.\.?(/|$)|//|/$"        # relative paths that os.path.normpath would change


@dataclass(frozen=True)
class IndexInfo:
    path: str
    kind: str
    n_rows: int
    shard_size: int
    identity: str
    extra_types: dict[str, pa.DataType]
    dropped: tuple[Duplicate, ...] = ()      # repeated paths dropped (later occurrences)
    same_file: int = 0                       # distinct keys naming an already listed file
    meta: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_size)


# -- writing -------------------------------------------------------------------------------------

def group_shards(shard_size: int) -> int:
    """Shards per row group of the index."""
    return max(1, GROUP_ROWS // shard_size)


class _ShardAlignedWriter:
    """Buffers rows and writes row groups of group_shards() whole shards each."""

    def __init__(self, path: str, schema: pa.Schema, shard_size: int):
        self.group_rows = shard_size * group_shards(shard_size)
        self.schema = schema
        self.flush_rows = max(1, (1 << 17) // self.group_rows) * self.group_rows
        self.writer = pq.ParquetWriter(path, schema, compression="zstd", use_dictionary=False,
                                       write_statistics=False)
        self.buf: list[pa.Table] = []
        self.n_buf = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.buf.append(table)
        self.n_buf += table.num_rows
        if self.n_buf >= self.flush_rows:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        if not self.buf:
            return
        t = pa.concat_tables(self.buf).combine_chunks()
        n = t.num_rows if final else t.num_rows // self.group_rows * self.group_rows
        if n:
            self.writer.write_table(t.slice(0, n), row_group_size=self.group_rows)
            self.rows += n
        rest = t.slice(n)
        self.buf, self.n_buf = ([rest], rest.num_rows) if rest.num_rows else ([], 0)

    def close(self, meta: dict[str, Any]) -> None:
        self._flush(final=True)
        self.writer.add_key_value_metadata({META_KEY: json.dumps(meta, ensure_ascii=False)})
        self.writer.close()


def meta_of(pf: pq.ParquetFile, path: str | os.PathLike) -> dict[str, Any]:
    """The build record of an opened index file."""
    md = pf.metadata.metadata or {}
    if META_KEY not in md:
        raise ValueError(f"{path} is not a manifest index")
    return json.loads(md[META_KEY])


# -- hashed duplicate check ------------------------------------------------------------------------

def hash_strings(values: list[str]) -> np.ndarray:
    """64-bit hashes (Python's SipHash, stable within this process) of a batch of strings."""
    return np.fromiter(map(hash, values), dtype=np.int64, count=len(values))


def colliding(hashes: np.ndarray) -> np.ndarray:
    """Sorted positions whose hash occurs more than once (the only rows compared exactly).
    Memory: one sorted copy of the hashes (8 bytes a row) and a boolean mask."""
    if len(hashes) < 2:
        return np.empty(0, np.int64)
    hs = np.sort(hashes)
    eq = hs[1:] == hs[:-1]
    if not eq.any():
        return np.empty(0, np.int64)
    repeated = np.unique(hs[1:][eq])
    del hs, eq
    return np.flatnonzero(np.isin(hashes, repeated))


def exact_groups(rows: np.ndarray, values: list[str]) -> list[list[int]]:
    """Rows (ascending) grouped by equal value; only groups of two or more."""
    groups: dict[str, list[int]] = defaultdict(list)
    for r, v in zip(rows.tolist(), values):
        groups[v].append(r)
    return [g for g in groups.values() if len(g) > 1]


def _take(path: str, column: str, rows: np.ndarray, group_rows: int) -> list[Any]:
    """Values of `column` at global `rows` (ascending) of an index written in row groups of
    `group_rows` rows, reading their row groups only."""
    pf = pq.ParquetFile(path)
    out: list[Any] = []
    groups = rows // group_rows
    for g in np.unique(groups).tolist():
        col = pf.read_row_group(g, columns=[column]).column(0)
        out.extend(col.take(pa.array(rows[groups == g] - g * group_rows)).to_pylist())
    return out


# -- resolved paths ------------------------------------------------------------------------------

def resolved_paths(paths: pa.Array, root: str) -> list[str]:
    """What each manifest path names: a URL as is, an absolute path as written, a relative path
    joined to the root and normalised (pipeline/manifest.py's rule), vectorised for clean paths."""
    url = pc.match_substring_regex(paths, URL_RE.pattern)
    absolute = pc.starts_with(paths, "/")
    direct = pc.or_(url, absolute)
    joined = pc.binary_join_element_wise(root.rstrip("/"), paths, "/")
    out = pc.if_else(direct, paths, joined).to_pylist()
    fix = pc.and_(pc.invert(direct), pc.match_substring_regex(paths, _UNCLEAN))
    for i in np.flatnonzero(fix.to_numpy(zero_copy_only=False)).tolist():
        out[i] = os.path.normpath(os.path.join(root, paths[i].as_py()))
    return out


# -- the build -----------------------------------------------------------------------------------

class _Build:
    def __init__(self, spec: InputSpec, out: Path, shard_size: int, schema: pa.Schema):
        self.spec = spec
        self.out = out
        self.tmp = str(out.with_name(f".{out.name}.{os.getpid()}.tmp"))
        self.shard_size = shard_size
        self.schema = schema
        self.writer = _ShardAlignedWriter(self.tmp, schema, shard_size)
        self.key_hashes: list[np.ndarray] = []
        self.res_hashes: list[np.ndarray] = []
        self.lines: list[np.ndarray] = []

    def add(self, lines: np.ndarray, columns: dict[str, Any], resolved: list[str] | None = None) -> None:
        """One batch of rows (columns the batch lacks are null) with their line numbers."""
        columns = {f.name: columns[f.name] if f.name in columns else pa.nulls(len(lines), f.type) for f in self.schema}
        table = pa.Table.from_pydict(columns, schema=self.schema)
        self.key_hashes.append(hash_strings(table.column("key").to_pylist()))
        if resolved is not None:
            self.res_hashes.append(hash_strings(resolved))
        self.lines.append(lines.astype(np.int32) if len(lines) and lines[-1] < 2**31 else lines)
        self.writer.add(table)

    def abort(self) -> None:
        try:
            self.writer.writer.close()
        except Exception:  # noqa: BLE001 - cleaning up after an error already being raised
            pass
        for p in (self.tmp, self.tmp + ".2"):
            if os.path.exists(p):
                os.unlink(p)


def _check_batch(b: EntryBatch, where: str) -> None:
    """pipeline/manifest.py's per-row errors: an empty path, or (with ids) an empty id."""
    bad_path = pc.fill_null(pc.or_kleene(pc.is_null(b.paths), pc.equal(
        pc.utf8_length(pc.utf8_trim(b.paths, characters=py_whitespace())), 0)), True)
    first = [(int(b.lines[i]), "empty or missing path")
             for i in np.flatnonzero(bad_path.to_numpy(zero_copy_only=False))[:1].tolist()]
    if b.ids is not None:
        bad_id = pc.fill_null(pc.equal(b.ids, ""), True)
        first += [(int(b.lines[i]), "empty id (give every row an id, or none)")
                  for i in np.flatnonzero(bad_id.to_numpy(zero_copy_only=False))[:1].tolist()]
    if first:
        line, what = min(first)
        raise JobError(f"{where} line {line}: {what}")


def _manifest_batches(spec: InputSpec) -> tuple[dict[str, pa.DataType], Any]:
    path = Path(spec.manifest)
    if spec.format == "txt":
        return {}, read_txt(path)
    if spec.format in ("csv", "tsv"):
        names, batches = read_csv(path, "," if spec.format == "csv" else "\t")
        return {k: pa.string() for k in names}, batches
    if spec.format == "jsonl":
        return read_jsonl(path)
    return read_parquet(path)


def _schema(kind: str, extra_types: dict[str, pa.DataType]) -> pa.Schema:
    return pa.schema([pa.field("key", pa.string()), pa.field("path", pa.string()), *LOCATOR_COLUMNS[kind],
                      *(pa.field(EXTRA + k, t) for k, t in extra_types.items())])


def _build_manifest(spec: InputSpec, out: Path, shard_size: int) -> tuple[_Build, dict, list[str], bool]:
    extra_types, batches = _manifest_batches(spec)
    b = _Build(spec, out, shard_size, _schema("manifest", extra_types))
    has_ids = False
    try:
        for batch in batches:
            _check_batch(batch, spec.manifest)
            has_ids = batch.ids is not None
            cols = {"key": batch.ids if has_ids else batch.paths, "path": batch.paths,
                    **{EXTRA + k: v for k, v in batch.extra.items()}}
            b.add(batch.lines, cols, resolved_paths(batch.paths, spec.root))
    except BaseException:
        b.abort()
        raise
    return b, {}, [ident.list_digest(spec)], has_ids


def _rows_table_tar(given: str, si: int, rows) -> tuple[dict[str, list], int]:
    cols: dict[str, list] = {k: [] for k in ("key", "path", "source", "member", "offset", "size", "status",
                                             "message", EXTRA + "txt", EXTRA + "json")}
    for r in rows:
        if r.shard_row:
            key = path = given + r.key
        else:
            key, path = r.key, f"{given}#{r.member if r.member is not None else r.key}"
        for k, v in (("key", key), ("path", path), ("source", si), ("member", r.member), ("offset", r.offset),
                     ("size", r.size), ("status", r.status), ("message", r.message), (EXTRA + "txt", r.txt),
                     (EXTRA + "json", r.json)):
            cols[k].append(v)
    return cols, len(rows)


def _build_tar(spec: InputSpec, out: Path, shard_size: int) -> tuple[_Build, dict, list[str], bool]:
    b = _Build(spec, out, shard_size, _schema("tar", {"txt": pa.string(), "json": pa.string()}))
    parts = [ident.list_digest(spec)]
    sources = []
    row = 1
    try:
        for si, given in enumerate(spec.files):
            file = spec.resolve(given)
            rows, digest = scan_tar(file, spec.options.max_bytes)
            parts.append(digest)
            sources.append({"given": given, "file": file})
            cols, n = _rows_table_tar(given, si, rows)
            b.add(np.arange(row, row + n, dtype=np.int64), cols)
            row += n
    except BaseException:
        b.abort()
        raise
    return b, {"sources": sources}, parts, True


def _build_parquet_bytes(spec: InputSpec, out: Path, shard_size: int) -> tuple[_Build, dict, list[str], bool]:
    opts = spec.options
    files = [(given, spec.resolve(given)) for given in spec.files]
    first = None
    for given, file in files:
        try:
            first = layout(pq.read_schema(file), given, opts.image_column, opts.key_column), pq.read_schema(file)
            break
        except (OSError, pa.ArrowException):
            continue
    if first is None:
        raise JobError(f"{spec.given}: none of the {len(files)} Parquet file(s) can be read")
    lay0, schema0 = first
    extra_types = {k: schema0.field(k).type for k in lay0.passthrough}
    b = _Build(spec, out, shard_size, _schema("parquet_bytes", extra_types))
    parts = [ident.list_digest(spec)]
    sources = []
    row = 1
    try:
        for si, (given, file) in enumerate(files):
            try:
                pf = pq.ParquetFile(file)
                digest = ident.parquet_footer_digest(file)
            except (OSError, pa.ArrowException, ValueError) as e:
                status = "missing" if isinstance(e, FileNotFoundError) else "unreadable"
                sources.append({"given": given, "file": file, "image_column": None})
                parts.append(status)
                b.add(np.array([row]), {"key": [given], "path": [given], "source": [si], "row_group": [-1],
                                        "row": [-1], "status": [status], "message": [f"cannot read {given}: {e}"]})
                row += 1
                continue
            lay = layout(pf.schema_arrow, given, opts.image_column, opts.key_column)
            sources.append({"given": given, "file": file, "image_column": lay.image_column})
            parts.append(digest)
            present = [k for k in extra_types if k in pf.schema_arrow.names]
            file_row = 0
            for rg in range(pf.num_row_groups):
                t = pf.read_row_group(rg, columns=[lay.key_column, *present])
                n = t.num_rows
                keys = ids_as_text(t.column(lay.key_column).combine_chunks())
                bad = pc.fill_null(pc.equal(keys, ""), True).to_numpy(zero_copy_only=False)
                if bad.any():
                    raise JobError(f"{given} row {row + int(np.flatnonzero(bad)[0])}: empty key "
                                   f"(column {lay.key_column!r})")
                cols = {"key": keys, "source": pa.array(np.full(n, si, np.int32)),
                        "row_group": pa.array(np.full(n, rg, np.int32)), "row": pa.array(np.arange(n, dtype=np.int32)),
                        "status": pa.nulls(n, pa.string()), "message": pa.nulls(n, pa.string()),
                        # path: the file as written + '#' + the row's number within the file
                        "path": pc.binary_join_element_wise(
                            given, pa.array(np.arange(file_row, file_row + n)).cast(pa.string()), "#")}
                for k, t_ in extra_types.items():
                    if k in present:
                        try:
                            cols[EXTRA + k] = t.column(k).combine_chunks().cast(t_)
                        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
                            raise JobError(f"{given}: column {k!r} cannot be read as {t_} like the first file's ({e})") from None
                    else:
                        cols[EXTRA + k] = pa.nulls(n, t_)
                b.add(np.arange(row, row + n, dtype=np.int64), cols)
                row += n
                file_row += n
    except BaseException:
        b.abort()
        raise
    return b, {"sources": sources}, parts, True


BUILDERS: dict[str, Callable[..., tuple[_Build, dict, list[str], bool]]] = {
    "manifest": _build_manifest, "tar": _build_tar, "parquet_bytes": _build_parquet_bytes}


def _stats(spec: InputSpec, extra: dict) -> list[dict[str, Any]]:
    files = ([spec.manifest] if spec.manifest else []) + [s["file"] for s in extra.get("sources", [])]
    return [{"file": f, "stat": ident.stat_of(f)} for f in files]


def build_index(spec: InputSpec, out: str | os.PathLike, shard_size: int) -> IndexInfo:
    """Write the index of `spec` to `out` (atomically) and return what it holds."""
    if shard_size < 1:
        raise JobError("the shard size must be at least 1")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # unique_keys: a repeated key is an error (ids, sample keys); otherwise later repeats are dropped
    b, extra_meta, parts, unique_keys = BUILDERS[spec.kind](spec, out, shard_size)
    if spec.kind == "manifest":
        extra_meta = {**extra_meta, "keyed_by_path": not unique_keys}      # no id column: the path is the key
    try:
        n = b.writer.rows + b.writer.n_buf
        if n == 0:
            raise JobError(f"{'manifest' if spec.manifest else 'input'} {spec.manifest or spec.given} lists no images")
        meta = {"version": ident.VERSION, "kind": spec.kind, "format": spec.format, "given": spec.given,
                "manifest": spec.manifest, "root": spec.root, "options": ident.options_record(spec),
                "shard_size": shard_size, "group_shards": group_shards(shard_size), "n_rows": n,
                "identity": ident.combine(spec, parts), "parts": parts,
                "stats": _stats(spec, extra_meta), "dropped": 0, **extra_meta}
        b.writer.close(meta)
        pa.default_memory_pool().release_unused()      # the parse buffers: the checks below need the room
        key_h = np.concatenate(b.key_hashes)
        b.key_hashes = []
        lines = np.concatenate(b.lines)
        b.lines = []
        dropped, keep = _duplicates(b, key_h, lines, unique_keys, b.writer.group_rows, spec)
        del key_h, lines
        path = b.tmp
        if dropped:
            meta = {**meta, "n_rows": int(keep.sum()), "dropped": len(dropped),
                    "dropped_first": [[d.key, d.first_line, d.line] for d in dropped[:20]]}
            path = _rewrite(b, keep, meta)
        same_file = 0
        if b.res_hashes:
            res_h = np.concatenate(b.res_hashes)
            b.res_hashes = []
            same_file = _same_file(path, res_h if keep.all() else res_h[keep], b.writer.group_rows, spec.root)
            del res_h
        _publish(path, out)
        for p in (b.tmp, b.tmp + ".2"):
            if os.path.exists(p):
                os.unlink(p)
    except BaseException:
        b.abort()
        raise
    warn_duplicates(spec.manifest or spec.given, dropped, same_file)
    types = {f.name[len(EXTRA):]: f.type for f in b.schema if f.name.startswith(EXTRA)}
    return IndexInfo(str(out), spec.kind, meta["n_rows"], shard_size, meta["identity"], types, tuple(dropped),
                     same_file, meta)


def _duplicates(b: _Build, key_h: np.ndarray, lines: np.ndarray, ids: bool, group_rows: int,
                spec: InputSpec) -> tuple[list[Duplicate], np.ndarray]:
    keep = np.ones(len(key_h), bool)
    cand = colliding(key_h)
    if not len(cand):
        return [], keep
    groups = exact_groups(cand, _take(b.tmp, "key", cand, group_rows))
    if not groups:
        return [], keep
    if ids:
        g = min(groups, key=lambda g: g[1])           # the first repeat in input order, as a reader meets it
        key = _take(b.tmp, "key", np.array([g[0]]), group_rows)[0]
        if spec.kind == "manifest":
            raise JobError(f"{spec.manifest} line {lines[g[1]]}: id {key!r} already used on line {lines[g[0]]}")
        p = _take(b.tmp, "path", np.array(g[:2]), group_rows)
        raise JobError(f"{spec.given}: key {key!r} is used twice ({p[0]} and {p[1]}); sample keys must be unique")
    dropped: list[tuple[int, Duplicate]] = []
    for g in groups:
        key = _take(b.tmp, "key", np.array([g[0]]), group_rows)[0]
        for r in g[1:]:
            keep[r] = False
            dropped.append((r, Duplicate(key, int(lines[g[0]]), int(lines[r]))))
    return [d for _, d in sorted(dropped, key=lambda x: x[0])], keep


def _rewrite(b: _Build, keep: np.ndarray, meta: dict) -> str:
    """Copy the index without the dropped rows, re-cut into shard-aligned row groups."""
    dst = b.tmp + ".2"
    w = _ShardAlignedWriter(dst, b.schema, b.shard_size)
    start = 0
    for rb in pq.ParquetFile(b.tmp).iter_batches(batch_size=1 << 16, use_threads=False):
        n = rb.num_rows
        w.add(pa.Table.from_batches([rb]).filter(pa.array(keep[start:start + n])))
        start += n
    w.close(meta)
    return dst


def _same_file(path: str, res_h: np.ndarray, group_rows: int, root: str) -> int:
    cand = colliding(res_h)                       # positions among the kept rows = rows of the final index
    if not len(cand):
        return 0
    paths = pa.array(_take(path, "path", cand, group_rows), pa.string())
    return sum(len(g) - 1 for g in exact_groups(cand, resolved_paths(paths, root)))


def _publish(tmp: str, out: Path) -> None:
    """Into place the project's crash-safe way (ledger.atomic_write: fsync, rename, fsync the folder)."""
    atomic_write(out, lambda dst: os.replace(tmp, dst))
