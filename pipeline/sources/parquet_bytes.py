"""Parquet files with the images' bytes in a column (img2dataset's `--output_format parquet`).

Listing reads only the key column and the passthrough columns (never the bytes); reading one
image reads its row group's image column once per worker process (Parquet cannot read a single
cell) and keeps it in a small cache, since a shard's images are consecutive rows.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import JobError
from pipeline.sources.locator import ParquetLocator, SourceError

IMAGE_COLUMNS = ("jpg", "jpeg", "png", "webp", "image", "img", "image_bytes", "bytes")   # auto-detected, in this order
CACHE_BYTES = 512 << 20           # per process: about two img2dataset row groups


def is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


@dataclass(frozen=True)
class BytesLayout:
    """Which columns of an image-bytes Parquet file are what."""

    image_column: str
    key_column: str
    passthrough: tuple[str, ...]    # every other non-binary column, in file order


def layout(schema: pa.Schema, where: str, image_column: str | None, key_column: str) -> BytesLayout:
    names = schema.names
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMNS if c in names and is_binary(schema.field(c).type)), None)
        if image_column is None:
            raise JobError(f"{where}: no image-bytes column (looked for a binary column named one of "
                           f"{', '.join(IMAGE_COLUMNS)}); name it with the image column option")
    elif image_column not in names or not is_binary(schema.field(image_column).type):
        raise JobError(f"{where}: no binary column {image_column!r} (columns: {', '.join(names)})")
    if key_column not in names:
        raise JobError(f"{where}: no key column {key_column!r} (columns: {', '.join(names)})")
    rest = tuple(n for n in names if n not in (image_column, key_column) and not is_binary(schema.field(n).type))
    return BytesLayout(image_column, key_column, rest)


_cache: OrderedDict[tuple, pa.Array] = OrderedDict()


def _column(loc: ParquetLocator) -> pa.Array:
    st = os.stat(loc.file)
    k = (loc.file, st.st_size, st.st_mtime_ns, loc.column, loc.row_group)
    if k in _cache:
        _cache.move_to_end(k)
        return _cache[k]
    pf = pq.ParquetFile(loc.file)
    if loc.row_group >= pf.num_row_groups:
        raise SourceError("missing", f"{loc.file} has no row group {loc.row_group} (the file changed)")
    arr = pf.read_row_group(loc.row_group, columns=[loc.column]).column(0).combine_chunks()
    _cache[k] = arr
    while len(_cache) > 1 and sum(a.nbytes for a in _cache.values()) > CACHE_BYTES:
        _cache.popitem(last=False)
    return arr


def read_cell(loc: ParquetLocator, max_bytes: int) -> bytes:
    """The image bytes of one row; a null cell, a short file or a changed file is a SourceError."""
    try:
        arr = _column(loc)
    except FileNotFoundError:
        raise SourceError("missing", f"no such file: {loc.file}") from None
    except (OSError, pa.ArrowException, KeyError) as e:
        raise SourceError("unreadable", f"cannot read {loc.file} row group {loc.row_group}: {e}") from None
    if loc.row >= len(arr):
        raise SourceError("missing", f"{loc.file} row group {loc.row_group} has no row {loc.row} (the file changed)")
    cell = arr[loc.row]
    if not cell.is_valid:
        raise SourceError("missing", f"no image bytes in this row (column {loc.column!r} is null)")
    buf = cell.as_buffer()
    if buf.size > max_bytes:
        raise SourceError("too_large", f"{buf.size} image bytes, over the cap of {max_bytes}")
    return buf.to_pybytes()
