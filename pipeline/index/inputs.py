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
    max_bytes: int = 64 << 20            # tar members claiming more are rows with status too_large


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


def _first_entries(manifest: Path, fmt: str) -> list[str]:
    """Every entry of a manifest whose first entry names a shard/Parquet file (such lists are short)."""
    from pipeline.index.parse import read_csv, read_parquet, read_txt, read_jsonl

    if fmt == "txt":
        batches = read_txt(manifest)
    elif fmt in ("csv", "tsv"):
        batches = read_csv(manifest, "," if fmt == "csv" else "\t")[1]
    elif fmt == "jsonl":
        batches = read_jsonl(manifest)[1]
    else:
        batches = read_parquet(manifest)[1]
    first = next(batches, None)
    if first is None or len(first.paths) == 0 or not first.paths[0].is_valid:
        return []
    head = str(first.paths[0]).lower()
    if not head.endswith(_TAR + _PARQUET):
        return []
    out = [p for p in first.paths.to_pylist()]
    for b in batches:
        out.extend(b.paths.to_pylist())
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
        raise JobError(f"input {given} does not exist or is not a file")
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
