"""Manifests: which images a run captions, in which order, under which stable keys.

Formats (picked by the file suffix): txt (one path a line, `#` comments, blank lines skipped),
csv / tsv (a header with a `path` column), jsonl (one object a line with "path"), parquet
(a `path` column). An optional `id` column gives the key; otherwise the key is the path as
written. Other columns are passthrough: kept and written next to the captions.

Relative paths are resolved against the manifest's folder, so a manifest and its images can move
together. Entries are kept as columns (not one object per image) because manifests reach
millions of lines; ImageRefs are made per shard, when a shard runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa

from pipeline.atomic import write_text_atomic
from pipeline.errors import JobError
from pipeline.index.formats import FORMATS, Duplicate, jsonl_object, warn_duplicates
from pipeline.records import ImageRef

log = logging.getLogger(__name__)

# Every extension Pillow registers for the formats the preprocessor opens (stages/preprocess.py
# ALLOWED_FORMATS, JPEG's MPO included); tests/test_manifest_text.py keeps the two in step.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".bmp", ".gif",
                              ".tif", ".tiff", ".avif", ".avifs"})


@dataclass(frozen=True)
class Manifest:
    source: str                                  # the manifest file as given
    root: str                                    # folder that relative paths are resolved against
    format: str
    keys: tuple[str, ...]
    paths: tuple[str, ...]                       # as written in the manifest
    extra: dict[str, list[Any]] = field(default_factory=dict)          # passthrough column -> values
    extra_types: dict[str, pa.DataType] = field(default_factory=dict)  # their Arrow types
    dropped: tuple[Duplicate, ...] = ()          # repeated keys: later occurrences are dropped
    same_file: int = 0                           # distinct keys that resolve to an already listed file
    digest: str = ""                             # identity of the content: changes when any entry does

    def __len__(self) -> int:
        return len(self.keys)

    def resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.normpath(os.path.join(self.root, path))

    def n_shards(self, shard_size: int) -> int:
        return -(-len(self) // shard_size)

    def shard_indices(self, shard: int, shard_size: int) -> range:
        return range(shard * shard_size, min(len(self), (shard + 1) * shard_size))

    def ref(self, i: int, shard: int) -> ImageRef:
        extra = {name: values[i] for name, values in self.extra.items()}
        return ImageRef(key=self.keys[i], path=self.paths[i], resolved=self.resolve(self.paths[i]),
                        shard=shard, index=i, extra=extra)

    def refs(self, shard: int, shard_size: int) -> list[ImageRef]:
        return [self.ref(i, shard) for i in self.shard_indices(shard, shard_size)]


# -- readers: each yields (line number, fields) --------------------------------------------------

def _read_txt(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                yield n, {"path": line}


def _read_csv(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        if not reader.fieldnames or "path" not in reader.fieldnames:
            raise JobError(f"{path}: the header must have a 'path' column (found: {reader.fieldnames})")
        for row in reader:
            if None in row:
                raise JobError(f"{path} line {reader.line_num}: more fields than header columns")
            yield reader.line_num, row


def _read_jsonl(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            obj = jsonl_object(path, n, line)
            if obj is not None:
                yield n, obj



def _parquet_columns(path: Path) -> tuple[dict[str, list], dict[str, pa.DataType]]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as e:
        raise JobError(f"{path}: cannot read the Parquet manifest ({e})") from None
    if "path" not in table.column_names:
        raise JobError(f"{path}: the Parquet manifest needs a 'path' column (found: {table.column_names})")
    return ({name: table.column(name).to_pylist() for name in table.column_names},
            {f.name: f.type for f in table.schema})


# -- building ------------------------------------------------------------------------------------

def _infer_type(values: list[Any]) -> tuple[pa.DataType, list[Any]]:
    """An Arrow type for a jsonl passthrough column; mixed types are kept as JSON text."""
    try:
        arr = pa.array(values)
        if pa.types.is_null(arr.type):
            return pa.string(), values
        return arr.type, values
    except (pa.ArrowException, TypeError, ValueError, OverflowError):   # OverflowError: an int beyond int64
        return pa.string(), [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]


def read_manifest(source: str | os.PathLike) -> Manifest:
    """Parse a manifest file; a problem with the file itself is a JobError naming file and line."""
    path = Path(source)
    if not path.is_file():
        raise JobError(f"manifest {path} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        raise JobError(f"{path}: .json manifests are not supported; use .jsonl (one object a line)")
    fmt = FORMATS.get(suffix, "txt")
    lines: list[int] = []
    paths: list[str] = []
    ids: list[Any] = []
    extra: dict[str, list[Any]] = {}
    types: dict[str, pa.DataType] = {}
    try:
        if fmt == "parquet":
            cols, types = _parquet_columns(path)
            paths = cols.pop("path")
            ids = cols.pop("id", [])
            types.pop("path")
            types.pop("id", None)
            extra = cols
            lines = list(range(1, len(paths) + 1))          # row numbers stand in for lines
        else:
            reader = {"txt": lambda: _read_txt(path), "csv": lambda: _read_csv(path, ","),
                      "tsv": lambda: _read_csv(path, "\t"), "jsonl": lambda: _read_jsonl(path)}[fmt]()
            rows = list(reader)
            names: list[str] = []
            for _, row in rows:
                for k in row:
                    if k not in ("path", "id") and k not in extra:
                        extra[k] = []
                        names.append(k)
            for n, row in rows:
                lines.append(n)
                paths.append(row.get("path"))
                if "id" in row:
                    ids.append(row["id"])
                elif ids:
                    ids.append(None)
                for k in names:
                    extra[k].append(row.get(k))
            if ids and len(ids) < len(paths):             # 'id' appeared only on later jsonl lines
                ids = [None] * (len(paths) - len(ids)) + ids
            if fmt == "jsonl":
                for k in names:
                    types[k], extra[k] = _infer_type(extra[k])
            else:
                types = {k: pa.string() for k in names}
    except UnicodeDecodeError as e:
        raise JobError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise JobError(f"cannot read manifest {path}: {e.strerror or e}") from None
    return _build(path, fmt, lines, paths, ids, extra, types)


def _build(path: Path, fmt: str, lines: list[int], paths: list[Any], ids: list[Any],
           extra: dict[str, list[Any]], types: dict[str, pa.DataType]) -> Manifest:
    root = os.path.dirname(os.path.abspath(path))
    keys: list[str] = []
    keep: list[int] = []
    first_line: dict[str, int] = {}
    dropped: list[Duplicate] = []
    files: set[str] = set()
    same_file = 0
    h = hashlib.sha256()
    for i, p in enumerate(paths):
        if not isinstance(p, str) or not p.strip():
            raise JobError(f"{path} line {lines[i]}: empty or missing path")
        if ids:
            if ids[i] is None or str(ids[i]) == "":
                raise JobError(f"{path} line {lines[i]}: empty id (give every row an id, or none)")
            key = str(ids[i])
            if key in first_line:
                raise JobError(f"{path} line {lines[i]}: id {key!r} already used on line {first_line[key]}")
        else:
            key = p
            if key in first_line:       # same path twice: caption it once
                dropped.append(Duplicate(key, first_line[key], lines[i]))
                continue
        first_line[key] = lines[i]
        resolved = p if os.path.isabs(p) else os.path.normpath(os.path.join(root, p))
        if resolved in files:
            same_file += 1
        files.add(resolved)
        keys.append(key)
        keep.append(i)
        h.update(json.dumps([key, p, [extra[k][i] for k in extra]], ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    warn_duplicates(path, dropped, same_file)
    if not keys:
        raise JobError(f"manifest {path} lists no images")
    if len(keep) != len(paths):
        paths = [paths[i] for i in keep]
        extra = {k: [v[i] for i in keep] for k, v in extra.items()}
    return Manifest(source=str(path), root=root, format=fmt, keys=tuple(keys), paths=tuple(paths),
                    extra=extra, extra_types=types, dropped=tuple(dropped), same_file=same_file,
                    digest="sha256:" + h.hexdigest())


# -- building a manifest from a folder -------------------------------------------------------------

def scan_images(folder: str | os.PathLike) -> list[str]:
    """Image files under `folder` (recursive, by extension), as sorted '/'-separated relative paths.

    A name that is not UTF-8 (os.walk hands its bytes back as surrogate escapes) cannot be written
    into a manifest, which is UTF-8 text: such files are left out with a warning naming them."""
    root = Path(folder)
    if not root.is_dir():
        raise JobError(f"{root} is not a folder")
    found, undecodable = [], []
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda e: log.warning("skipped %s: %s", e.filename, e.strerror)):
        dirnames.sort()
        for name in filenames:
            # the text after the last dot: splitext would call "..jpg" or ".jpg" extension-less
            if name[name.rfind("."):].lower() in IMAGE_EXTENSIONS:
                rel = Path(dirpath, name).relative_to(root).as_posix()
                (found if _is_utf8(rel) else undecodable).append(rel)
    _left_out(undecodable, "their names are not UTF-8 (a manifest is UTF-8 text)")
    return sorted(found)


def _is_utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _left_out(names: list[str], why: str) -> None:
    if names:
        shown = ", ".join(ascii(n) for n in names[:5]) + (" ..." if len(names) > 5 else "")
        log.warning("left out %d image(s), %s: %s", len(names), why, shown)


def txt_line_ok(line: str) -> bool:
    """Would _read_txt give this path back? Not if it holds a line break, starts or ends with
    whitespace (lines are stripped) or starts with '#' (a comment)."""
    return bool(line) and line == line.strip() and not line.startswith("#") and "\n" not in line and "\r" not in line


def sample(paths: list[str], n: int | None, seed: int) -> list[str]:
    """A seeded random sample of n paths (sorted, so manifests diff well); all paths when n is None."""
    if n is None or n >= len(paths):
        if n is not None:
            log.warning("asked for %d images but only %d were found; taking all", n, len(paths))
        return list(paths)
    if n < 1:
        raise JobError("--sample must be at least 1")
    return sorted(random.Random(seed).sample(sorted(paths), n))


def write_txt_manifest(out: str | os.PathLike, folder: str | os.PathLike, rel_paths: list[str], header: str) -> int:
    """Write a txt manifest whose paths are relative to the manifest's own folder; returns the
    count written. Paths a txt line cannot carry (txt_line_ok) are left out with a warning."""
    out = Path(out)
    if out.is_dir():
        raise JobError(f"-o {out} is a folder; give the manifest's file name (e.g. {out / 'manifest.txt'})")
    base = out.parent.resolve()
    lines = [f"# {line}" for line in header.splitlines()]
    unwritable = []
    for p in rel_paths:
        line = os.path.relpath(Path(folder).resolve() / p, base)
        if txt_line_ok(line):
            lines.append(line)
        else:
            unwritable.append(p)
    _left_out(unwritable, "a txt line cannot hold their names (a line break, edge whitespace or a leading #)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise JobError(f"cannot write -o {out}: {e.strerror or e}") from None
    write_text_atomic(out, "\n".join(lines) + "\n")
    return len(rel_paths) - len(unwritable)
