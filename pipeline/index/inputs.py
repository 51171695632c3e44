"""What the user gave as input, resolved once: a manifest of files/URLs, WebDataset tar shards, or
Parquet files with image bytes.

    data/list.txt | .csv | .tsv | .jsonl        a manifest of local paths and/or URLs
    data/list.parquet (with a `path` column)    the same, as Parquet
    data/shards.txt (every entry ends in .tar)  a manifest of WebDataset shards
    'shards/{000000..000999}.tar'               a brace pattern of shards (braceexpand)
    data/000123.tar                             one shard
    'parts/{00000..00099}.parquet', part.parquet   Parquet with an image-bytes column and a key column
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DEFAULT_MAX_IMAGE_BYTES
from pipeline.errors import JobError
from pipeline.index.formats import format_of

KINDS = ("manifest", "tar", "parquet_bytes")
_TAR = (".tar",)
_PARQUET = (".parquet", ".pq")


@dataclass(frozen=True)
class InputOptions:
    """How to read the inputs; part of the index's identity (a change means another index)."""

    image_column: str | None = None      # Parquet image-bytes column; None = auto (jpg, png, image...)
    key_column: str = "key"              # Parquet image-bytes: the sample key column
    max_bytes: int = DEFAULT_MAX_IMAGE_BYTES     # tar members claiming more are rows with status too_large


@dataclass(frozen=True)
class InputSpec:
    given: str                     # as the user wrote it
    kind: str                      # one of KINDS
    format: str                    # manifest format (txt, csv, tsv, jsonl, parquet) or "pattern" / "file"
    manifest: str | None           # absolute manifest path, None for a pattern or a single shard
    root: str                      # folder that relative entries resolve against
    files: tuple[str, ...] = ()    # tar / Parquet files as written (kinds tar, parquet_bytes)
    options: InputOptions = InputOptions()

    def resolve(self, p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(self.root, p))


def _kind_of_files(files: list[str], where: str) -> str:
    low = [f.lower() for f in files]
    if all(f.endswith(_TAR) for f in low):
        return "tar"
    if all(f.endswith(_PARQUET) for f in low):
        return "parquet_bytes"
    raise JobError(f"{where}: lists neither only .tar shards nor only .parquet files; "
                   "a list of images is a manifest, shards and Parquet files are listed alone")


def _peek(manifest: Path, fmt: str) -> str | None:
    """The manifest's first entry, reading as little as possible (a 10M-line manifest must not be
    parsed to find out what it lists); None when there is none or it cannot be read here (the
    index build then reports the problem with its line)."""
    import csv
    import json

    try:
        if fmt == "parquet":
            import pyarrow.parquet as pq

            batch = next(pq.ParquetFile(manifest).iter_batches(batch_size=1, columns=["path"]), None)
            return batch.column(0)[0].as_py() if batch is not None and batch.num_rows else None
        with open(manifest, encoding="utf-8-sig", newline="" if fmt in ("csv", "tsv") else None) as f:
            if fmt in ("csv", "tsv"):
                row = next(csv.DictReader(f, delimiter="," if fmt == "csv" else "\t"), None)
                return row.get("path") if row else None
            for line in f:
                line = line.strip()
                if fmt == "jsonl" and line:
                    obj = json.loads(line)
                    return obj.get("path") if isinstance(obj, dict) else None
                if line and not line.startswith("#"):
                    return line
    except (OSError, ValueError, KeyError, StopIteration, csv.Error):      # ValueError: JSON, UTF-8, Arrow
        return None
    return None


def _first_entries(manifest: Path, fmt: str) -> list[str]:
    """Every entry of a manifest whose first entry names a shard/Parquet file (such lists are short);
    [] for a manifest of images."""
    from pipeline.index.parse import read_csv, read_parquet, read_txt, read_jsonl

    head = _peek(manifest, fmt)
    if not isinstance(head, str) or not head.strip().lower().endswith(_TAR + _PARQUET):
        return []
    if fmt == "txt":
        batches = read_txt(manifest)
    elif fmt in ("csv", "tsv"):
        batches = read_csv(manifest, "," if fmt == "csv" else "\t")[1]
    elif fmt == "jsonl":
        batches = read_jsonl(manifest)[1]
    else:
        batches = read_parquet(manifest)[1]
    out = [p for b in batches for p in b.paths.to_pylist()]
    if any(not isinstance(p, str) or not p.strip() for p in out):
        raise JobError(f"{manifest}: an empty entry in a list of shards")
    return out


def resolve_input(given: str, options: InputOptions = InputOptions(), cwd: str | None = None) -> InputSpec:
    """Decide what `given` is; JobError (one line) when it is none of the supported inputs."""
    cwd = os.path.abspath(cwd or os.getcwd())
    if "{" in given:
        from braceexpand import braceexpand

        try:
            files = list(dict.fromkeys(braceexpand(given)))
        except Exception as e:  # noqa: BLE001 - braceexpand raises plain exceptions on bad patterns
            raise JobError(f"input pattern {given!r}: {e}") from None
        return InputSpec(given, _kind_of_files(files, f"pattern {given!r}"), "pattern", None, cwd, tuple(files), options)
    path = Path(given)
    if not path.is_file():
        raise JobError(f"input {given} does not exist or is not a file (--manifest / --input)")
    low = given.lower()
    if low.endswith(_TAR):
        return InputSpec(given, "tar", "file", None, cwd, (given,), options)
    fmt = format_of(path)
    root = os.path.dirname(os.path.abspath(path))
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            names = pq.read_schema(path).names
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a bad file
            raise JobError(f"{path}: cannot read the Parquet file ({e})") from None
        if "path" not in names:
            return InputSpec(given, "parquet_bytes", "file", None, cwd, (given,), options)
    entries = _first_entries(path, fmt)
    if entries:
        files = list(dict.fromkeys(entries))          # a shard listed twice is read once
        return InputSpec(given, _kind_of_files(files, str(path)), fmt, os.path.abspath(path), root, tuple(files), options)
    return InputSpec(given, "manifest", fmt, os.path.abspath(path), root, (), options)
