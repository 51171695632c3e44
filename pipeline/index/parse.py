"""Streamed manifest parsing: every format as batches of Arrow columns (never one object a line).

Each reader yields EntryBatch records: the line numbers, the `path` column, the `id` column (if
the manifest has one) and the passthrough columns with their final types. They reproduce
pipeline/manifest.py's semantics (which `tests/test_manifest_index.py` checks on generated
manifests) except where noted:

    txt      lines split on \\n, \\r\\n and \\r, stripped as str.strip() does, blank and '#' lines
             skipped; a UTF-8 BOM at the start is ignored. Split and stripped by Arrow kernels.
    csv/tsv  pyarrow's CSV reader, every column as text. Departure: a row with fewer fields than
             the header is an error here (the Python reader filled None); line numbers count
             records + 1 (equal to the file's lines unless quoted values hold newlines).
    jsonl    json.loads per line (Arrow's JSON reader infers types per block and differs from
             pa.array's inference). Two streamed passes: the first finds the passthrough columns and
             their type (pa.array inference over the whole column; mixed types -> JSON text), the
             second converts batch by batch.
    parquet  streamed record batches; column types kept.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.errors import JobError
from pipeline.index.formats import jsonl_object, py_whitespace

BLOCK = 8 << 20            # bytes of text parsed at once
BATCH = 1 << 16            # rows per batch for the Python-level (jsonl) and Parquet readers
_NEWLINE = r"\r\n|\r|\n"


@dataclass
class EntryBatch:
    lines: np.ndarray                 # int64 [n]: 1-based line (txt, jsonl), record + 1 (csv) or row (parquet) numbers
    paths: pa.Array                   # [n] the path column as written (validated by the builder)
    ids: pa.Array | None              # [n] string ids, or None when the manifest has no id column
    extra: dict[str, pa.Array]        # passthrough columns [n] each, in manifest order


# -- text blocks ---------------------------------------------------------------------------------

def _utf8(block: bytes, start: int, path: Path) -> pa.Array:
    try:
        return pa.array([block], pa.large_binary()).cast(pa.large_string())
    except pa.ArrowInvalid:
        try:
            block.decode("utf-8")
        except UnicodeDecodeError as e:
            raise JobError(f"{path}: not UTF-8 text ({e.reason} at byte {start + e.start})") from None
        raise


def text_lines(path: Path) -> Iterator[tuple[int, pa.Array]]:
    """(number of the first line, its lines as a string array) per block, Python's line rules."""
    line = 1
    offset = 0
    carry = b""
    with open(path, "rb") as f:
        first = True
        while True:
            chunk = f.read(BLOCK)
            data = carry + chunk
            if first:
                if data.startswith(b"\xef\xbb\xbf"):
                    data, offset = data[3:], 3
                first = False
            if chunk:
                cut = data.rfind(b"\n") + 1
                if cut == 0:                       # no \n: cut after a \r not at the very end
                    cut = data.rfind(b"\r", 0, len(data) - 1) + 1
                if cut == 0:
                    carry = data
                    continue
                block, carry = data[:cut], data[cut:]
            else:
                block, carry = data, b""
            if not block:
                break
            parts = pc.list_flatten(pc.split_pattern_regex(_utf8(block, offset, path), _NEWLINE))
            if block.endswith((b"\n", b"\r")):
                parts = parts.slice(0, len(parts) - 1)     # the empty tail after the last newline
            yield line, parts.cast(pa.string())
            line += len(parts)
            offset += len(block)
            if not chunk:
                break


# -- txt -----------------------------------------------------------------------------------------

def read_txt(path: Path) -> Iterator[EntryBatch]:
    for first, lines in text_lines(path):
        stripped = pc.utf8_trim(lines, characters=py_whitespace())
        keep = pc.and_(pc.greater(pc.utf8_length(stripped), 0), pc.invert(pc.starts_with(stripped, "#")))
        numbers = np.arange(first, first + len(lines), dtype=np.int64)[keep.to_numpy(zero_copy_only=False)]
        yield EntryBatch(numbers, stripped.filter(keep), None, {})


# -- csv / tsv -----------------------------------------------------------------------------------

def csv_header(path: Path, delimiter: str) -> list[str]:
    with open(path, encoding="utf-8-sig", newline="") as f:
        names = next(csv.reader(f, delimiter=delimiter), None)
    if not names or "path" not in names:
        raise JobError(f"{path}: the header must have a 'path' column (found: {names})")
    if len(set(names)) != len(names):
        raise JobError(f"{path}: the header repeats a column name ({names})")
    return names


def read_csv(path: Path, delimiter: str) -> tuple[list[str], Iterator[EntryBatch]]:
    """(passthrough column names, batches)."""
    import pyarrow.csv as pcsv

    names = csv_header(path, delimiter)
    extra = [n for n in names if n not in ("path", "id")]

    def batches() -> Iterator[EntryBatch]:
        bad: list[Any] = []

        def invalid(row) -> str:
            bad.append(row)
            return "error"

        row = 0
        try:
            reader = pcsv.open_csv(        # reads the first block already: inside the try
                path, read_options=pcsv.ReadOptions(column_names=names, skip_rows=1, block_size=BLOCK, use_threads=False),
                parse_options=pcsv.ParseOptions(delimiter=delimiter, newlines_in_values=True,
                                                invalid_row_handler=invalid),
                convert_options=pcsv.ConvertOptions(column_types={n: pa.string() for n in names},
                                                    strings_can_be_null=False, quoted_strings_can_be_null=False))
            for rb in reader:
                n = rb.num_rows
                yield EntryBatch(np.arange(row + 2, row + 2 + n, dtype=np.int64), rb.column("path"),
                                 rb.column("id") if "id" in names else None, {k: rb.column(k) for k in extra})
                row += n
        except pa.ArrowInvalid as e:
            if bad:
                r = bad[0]
                where = f"line {r.number}" if r.number else f"row {row + 2}"
                more = "more" if r.actual_columns > r.expected_columns else "fewer"
                raise JobError(f"{path} {where}: {more} fields than header columns "
                               f"({r.actual_columns}, the header has {r.expected_columns})") from None
            if "UTF8" in str(e) or "utf8" in str(e).lower():
                raise JobError(f"{path}: not UTF-8 text ({e})") from None
            raise JobError(f"{path}: cannot parse as {'TSV' if delimiter == chr(9) else 'CSV'} ({e})") from None

    return extra, batches()


# -- jsonl ---------------------------------------------------------------------------------------

def _jsonl_objects(path: Path) -> Iterator[tuple[list[int], list[dict]]]:
    for first, lines in text_lines(path):
        numbers: list[int] = []
        objs: list[dict] = []
        for n, line in enumerate(lines.to_pylist(), first):
            obj = jsonl_object(path, n, line)
            if obj is None:
                continue
            numbers.append(n)
            objs.append(obj)
        for i in range(0, len(objs), BATCH):
            yield numbers[i:i + BATCH], objs[i:i + BATCH]


def _as_json_text(values: list[Any]) -> list[str | None]:
    return [None if v is None else json.dumps(v, ensure_ascii=False, sort_keys=True) for v in values]


def infer_type(values: list[Any]) -> pa.DataType | None:
    """pa.array's type for a passthrough column (null -> string); None when mixed (kept as JSON text)."""
    try:
        t = pa.array(values).type
    except (pa.ArrowException, TypeError, ValueError):
        return None
    return pa.string() if pa.types.is_null(t) else t


def _jsonl_columns(path: Path) -> tuple[list[str], bool, dict[str, pa.DataType | None]]:
    """Pass 1: passthrough names (first-appearance order), whether any row has an id, their types."""
    names: dict[str, None] = {}
    has_ids = False
    batch_types: dict[str, set] = {}
    for _, objs in _jsonl_objects(path):
        for obj in objs:
            has_ids = has_ids or "id" in obj
            for k in obj:
                if k not in ("path", "id") and k not in names:
                    names[k] = None
        for k in names:
            vals = [o.get(k) for o in objs]
            if any(v is not None for v in vals):
                batch_types.setdefault(k, set()).add(infer_type(vals) or "mixed")
    types: dict[str, pa.DataType | None] = {}
    differ = []
    for k in names:
        seen = batch_types.get(k, set())
        if "mixed" in seen:
            types[k] = None
        elif len(seen) <= 1:
            types[k] = next(iter(seen), pa.string())
        else:
            differ.append(k)
    if differ:          # batches disagree: infer over the whole column, as the Python reader does
        whole: dict[str, list] = {k: [] for k in differ}
        for _, objs in _jsonl_objects(path):
            for k in differ:
                whole[k].extend(o.get(k) for o in objs)
        for k in differ:
            types[k] = infer_type(whole[k])
    return list(names), has_ids, types


def read_jsonl(path: Path) -> tuple[dict[str, pa.DataType], Iterator[EntryBatch]]:
    names, has_ids, types = _jsonl_columns(path)
    final = {k: (t if t is not None else pa.string()) for k, t in types.items()}

    def column(values: list[Any], t: pa.DataType | None) -> pa.Array:
        return pa.array(_as_json_text(values), pa.string()) if t is None else pa.array(values, t)

    def batches() -> Iterator[EntryBatch]:
        for numbers, objs in _jsonl_objects(path):
            paths = [o.get("path") for o in objs]
            for n, p in zip(numbers, paths):
                if not isinstance(p, str):
                    raise JobError(f"{path} line {n}: empty or missing path")
            ids = None
            if has_ids:
                ids = pa.array([None if o.get("id") is None else str(o.get("id")) for o in objs], pa.string())
            yield EntryBatch(np.asarray(numbers, dtype=np.int64), pa.array(paths, pa.string()), ids,
                             {k: column([o.get(k) for o in objs], types[k]) for k in names})

    return final, batches()


# -- parquet -------------------------------------------------------------------------------------

def ids_as_text(ids: pa.Array) -> pa.Array:
    """str() of each id, as the Python reader keys rows (Arrow's casts agree for text and integers)."""
    t = ids.type
    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_integer(t):
        return ids.cast(pa.string())
    return pa.array([None if v is None else str(v) for v in ids.to_pylist()], pa.string())


def read_parquet(path: Path) -> tuple[dict[str, pa.DataType], Iterator[EntryBatch]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise JobError(f"{path}: cannot read the Parquet manifest ({e})") from None
    schema = pf.schema_arrow
    if "path" not in schema.names:
        raise JobError(f"{path}: the Parquet manifest needs a 'path' column (found: {schema.names})")
    extra = {f.name: f.type for f in schema if f.name not in ("path", "id")}
    has_ids = "id" in schema.names

    def batches() -> Iterator[EntryBatch]:
        row = 1
        for rb in pf.iter_batches(batch_size=BATCH, use_threads=False):
            n = rb.num_rows
            p = rb.column("path")
            if not (pa.types.is_string(p.type) or pa.types.is_large_string(p.type)):
                if n and pc.sum(pc.is_valid(p)).as_py():
                    raise JobError(f"{path} row {row}: empty or missing path (the path column is {p.type})")
                p = pa.nulls(n, pa.string())
            yield EntryBatch(np.arange(row, row + n, dtype=np.int64), p.cast(pa.string()),
                             ids_as_text(rb.column("id")) if has_ids else None, {k: rb.column(k) for k in extra})
            row += n

    return extra, batches()
