"""The output table's Arrow schema, derived from the ResultRow record so schema and code cannot drift.

Columns: every ResultRow field (types from its annotations), then `index` and `shard` (where the
row sits in the manifest), `model` and `run_fingerprint` (which model and settings produced it),
then the manifest's passthrough columns (renamed `manifest_<name>` if a name is already taken).
The fingerprint and model name are also in the schema metadata of every file.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pyarrow as pa

from pipeline.records import ImageRef, ResultRow

_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}
POSITION_COLUMNS = [pa.field("index", pa.int64(), nullable=False), pa.field("shard", pa.int64(), nullable=False)]
RUN_COLUMNS = [pa.field("model", pa.string()), pa.field("run_fingerprint", pa.string())]


def _arrow_field(name: str, hint: Any) -> pa.Field:
    nullable = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(hint))
        if len(args) != 1:
            raise TypeError(f"ResultRow.{name}: unions of several types have no Arrow column type")
        hint = args[0]
    if hint not in _ARROW:
        raise TypeError(f"ResultRow.{name}: no Arrow type for {hint!r}; extend pipeline/schema.py")
    return pa.field(name, _ARROW[hint], nullable=nullable)


def record_fields() -> list[pa.Field]:
    hints = typing.get_type_hints(ResultRow)
    return [_arrow_field(f.name, hints[f.name]) for f in dataclasses.fields(ResultRow)]


def extra_column_names(names: list[str]) -> dict[str, str]:
    """Manifest column -> output column, avoiding the names the pipeline writes itself."""
    taken = {f.name for f in record_fields()} | {f.name for f in POSITION_COLUMNS + RUN_COLUMNS}
    out: dict[str, str] = {}
    for name in names:
        col = name if name not in taken else f"manifest_{name}"
        while col in taken:
            col = f"manifest_{col}"
        taken.add(col)
        out[name] = col
    return out


class OutputSchema:
    """Turns (ImageRef, ResultRow) pairs into Arrow tables with one fixed schema per run."""

    def __init__(self, extra_types: dict[str, pa.DataType], model: str, fingerprint: str):
        self.model = model
        self.fingerprint = fingerprint
        self.extra = extra_column_names(list(extra_types))
        fields = (record_fields() + POSITION_COLUMNS + RUN_COLUMNS
                  + [pa.field(self.extra[name], t) for name, t in extra_types.items()])
        self.schema = pa.schema(fields, metadata={b"pipeline.model": model.encode(),
                                                  b"pipeline.run_fingerprint": fingerprint.encode()})
        self._row_names = [f.name for f in dataclasses.fields(ResultRow)]

    def table(self, rows: list[tuple[ImageRef, ResultRow]]) -> pa.Table:
        rows = sorted(rows, key=lambda r: r[0].index)
        cols: dict[str, list[Any]] = {name: [getattr(row, name) for _, row in rows] for name in self._row_names}
        cols["index"] = [ref.index for ref, _ in rows]
        cols["shard"] = [ref.shard for ref, _ in rows]
        cols["model"] = [self.model] * len(rows)
        cols["run_fingerprint"] = [self.fingerprint] * len(rows)
        for name, col in self.extra.items():
            cols[col] = [ref.extra.get(name) for ref, _ in rows]
        return pa.Table.from_pydict(cols, schema=self.schema)
