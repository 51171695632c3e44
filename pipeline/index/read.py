"""Reading a manifest index: one shard's rows (its row group only) and cheap validation.

An index file is opened (its footer parsed) once per process: check_index and ManifestIndex share
the open file while it is the same file (path, inode, size, mtime)."""

from __future__ import annotations

import os
from typing import Any, Collection

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.index import identity as ident
from pipeline.index.build import EXTRA, LOCATOR_COLUMNS, meta_of, resolved_paths
from pipeline.index.inputs import InputSpec
from pipeline.records import ImageRef
from pipeline.sources import locator as L
from pipeline.sources.tar import scan_tar


_opened: dict[str, tuple[tuple[int, int, int], pq.ParquetFile, dict[str, Any]]] = {}


def open_file(path: str | os.PathLike) -> tuple[pq.ParquetFile, dict[str, Any]]:
    """(the index file, its build record), parsed once per process for one version of the file;
    OSError / ValueError / ArrowException when it is missing or not an index."""
    path = str(path)
    st = os.stat(path)
    key = (st.st_ino, st.st_size, st.st_mtime_ns)
    hit = _opened.get(path)
    if hit is not None and hit[0] == key:
        return hit[1], hit[2]
    pf = pq.ParquetFile(path)
    meta = meta_of(pf, path)
    _opened[path] = (key, pf, meta)           # one entry per path: a rebuilt index replaces the old one
    return pf, meta


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    return open_file(path)[1]


class ManifestIndex:
    """An index file opened for reading: the footer once, then any shard's row group on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        self.pf, self.meta = open_file(self.path)
        if self.meta.get("version") != ident.VERSION:
            raise ValueError(f"{path}: index version {self.meta.get('version')}, this program reads {ident.VERSION}")
        self.kind: str = self.meta["kind"]
        self.shard_size: int = self.meta["shard_size"]
        self.n_rows: int = self.meta["n_rows"]
        self.root: str = self.meta["root"]
        self.identity: str = self.meta["identity"]
        self.sources: list[dict] = self.meta.get("sources", [])
        self.group_shards: int = self.meta.get("group_shards", 1)
        self.extra_types = {f.name[len(EXTRA):]: f.type for f in self.pf.schema_arrow if f.name.startswith(EXTRA)}
        if self.pf.num_row_groups != -(-self.n_shards // self.group_shards):
            raise ValueError(f"{path}: {self.pf.num_row_groups} row groups for {self.n_shards} shards in groups "
                             f"of {self.group_shards}")

    def __len__(self) -> int:
        return self.n_rows

    @property
    def unique_paths(self) -> bool:
        """No two rows have the same `path`: a manifest keyed by its paths (no ids), tar shards and
        Parquet image bytes (a path names one member or row). An id manifest may list a file twice."""
        return self.kind != "manifest" or self.meta.get("keyed_by_path", False)

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_size)

    def shard_table(self, shard: int, columns: list[str] | None = None) -> pa.Table:
        """The rows of one shard, read from its row group alone."""
        g, k = divmod(shard, self.group_shards)
        return self.pf.read_row_group(g, columns=columns).slice(k * self.shard_size, self.shard_size)

    def _locator(self, row: dict[str, Any]) -> str:
        """The locator of a tar / Parquet-bytes row (a member, a cell, or a row the listing rejected)."""
        if row["status"] is not None:
            return L.encode(L.RejectedLocator(row["status"], row["message"] or row["status"]))
        src = self.sources[row["source"]]
        if self.kind == "tar":
            return L.encode(L.TarLocator(src["file"], row["member"], row["offset"], row["size"]))
        return L.encode(L.ParquetLocator(src["file"], src["image_column"], row["row_group"], row["row"]))

    def refs(self, shard: int, only: Collection[int] | None = None) -> list[ImageRef]:
        """The image references of one shard (or of its input positions in `only`), built only
        now: a process builds the refs of the shards it claims, when it claims them. Column by
        column (a manifest's paths are resolved by Arrow kernels), not row dicts."""
        t = self.shard_table(shard)
        start = shard * self.shard_size
        if self.kind == "manifest":
            resolved = resolved_paths(t.column("path").combine_chunks(), self.root)
        else:
            locator = [f.name for f in LOCATOR_COLUMNS[self.kind]]
            resolved = [self._locator(row) for row in t.select(locator).to_pylist()]
        keys, paths = t.column("key").to_pylist(), t.column("path").to_pylist()
        names = [c for c in t.column_names if c.startswith(EXTRA)]
        extra = [t.column(c).to_pylist() for c in names]
        names = [c[len(EXTRA):] for c in names]
        return [ImageRef(keys[i], paths[i], resolved[i], shard, start + i, dict(zip(names, (c[i] for c in extra))))
                for i in range(t.num_rows) if only is None or start + i in only]


def current_parts(spec: InputSpec) -> list[str]:
    """The per-input digests the index of `spec` would record now (the list's raw bytes, then each
    tar shard's listing or Parquet file's footer): reads headers and footers, never image data."""
    parts = [ident.list_digest(spec)]
    for given in spec.files:
        file = spec.resolve(given)
        if spec.kind == "tar":
            parts.append(scan_tar(file, spec.options.max_bytes)[1])
        else:
            try:
                parts.append(ident.parquet_footer_digest(file))
            except FileNotFoundError:
                parts.append("missing")
            except (OSError, ValueError):
                parts.append("unreadable")
    return parts


def current_identity(spec: InputSpec) -> str:
    """The identity the index of `spec` would have now."""
    return ident.combine(spec, current_parts(spec))


def check_index(path: str | os.PathLike, spec: InputSpec, shard_size: int) -> str | None:
    """None if the index at `path` is the index of `spec` now; else why not (one phrase).

    Cheap when nothing changed: the footer's record and one stat() per input file. Only when a
    file's size or mtime differs is its content digest recomputed, which then decides."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError, pa.ArrowException) as e:
        return f"the index cannot be read ({e})"
    if meta.get("version") != ident.VERSION:
        return f"the index has version {meta.get('version')}, not {ident.VERSION}"
    if meta.get("options") != ident.options_record(spec):
        return "it was built with other input options"
    if meta.get("shard_size") != shard_size:
        return f"it was cut into shards of {meta.get('shard_size')}, not {shard_size}"
    if meta.get("root") != spec.root or (meta.get("manifest") != spec.manifest if spec.manifest
                                         else meta.get("given") != spec.given):
        return "the input was given under another name or folder"
    files = ([spec.manifest] if spec.manifest else []) + [spec.resolve(g) for g in spec.files]
    recorded = meta.get("stats", [])
    if [s["file"] for s in recorded] != files:
        return "the input lists other files"
    if all(ident.stat_of(s["file"]) == s["stat"] for s in recorded):
        return None
    if current_identity(spec) != meta.get("identity"):
        return "the input's content changed since the index was built"
    return None
