"""Typed records that flow between stages. A failure is a record, never a crashed shard.

ImageRef      manifest   -> preprocess
ImageInputs   preprocess -> encode        (stages/records.py: it carries tensors)
VisionFeatures encode    -> caption       (stages/records.py)
Caption       caption    -> write
Failed        any stage  -> write (a row with status/error)

The records here hold plain values only, so the core (ledger, status, export) never imports torch
or a model. The output schema (pipeline/schema.py) is derived from `ResultRow` so schema and code
cannot drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ImageRef:
    key: str                       # stable id: manifest `id` column or the path as written
    path: str                      # the path as written in the manifest
    resolved: str                  # absolute path that is opened
    shard: int = 0
    index: int = 0                 # position in the manifest (output order)
    extra: dict[str, Any] = field(default_factory=dict)   # passthrough manifest columns


@dataclass(frozen=True)
class Caption:
    ref: ImageRef
    text: str
    token_ids: tuple[int, ...]
    n_prompt: int
    n_new: int
    finish: str                    # "eos" | "length"
    width: int
    height: int
    preprocess_s: float
    encode_s: float
    prefill_s: float
    decode_s: float


@dataclass(frozen=True)
class Failed:
    ref: ImageRef
    stage: str                     # "preprocess" | "encode" | "caption"
    status: str                    # short machine-readable cause, e.g. "unreadable", "too_large"
    error: str                     # one human-readable line


@dataclass(frozen=True)
class ResultRow:
    """One output row per manifest image; the Parquet schema is derived from these fields."""

    key: str
    path: str
    caption: str | None
    status: str                    # "ok" or the failure status
    error: str | None
    stage: str | None
    width: int | None
    height: int | None
    n_prompt_tokens: int | None
    n_new_tokens: int | None
    finish_reason: str | None
    preprocess_s: float | None
    encode_s: float | None
    prefill_s: float | None
    decode_s: float | None

    @staticmethod
    def from_record(r: Caption | Failed) -> "ResultRow":
        if isinstance(r, Caption):
            return ResultRow(key=r.ref.key, path=r.ref.path, caption=r.text, status="ok", error=None, stage=None,
                             width=r.width, height=r.height, n_prompt_tokens=r.n_prompt, n_new_tokens=r.n_new,
                             finish_reason=r.finish, preprocess_s=r.preprocess_s, encode_s=r.encode_s,
                             prefill_s=r.prefill_s, decode_s=r.decode_s)
        return ResultRow(key=r.ref.key, path=r.ref.path, caption=None, status=r.status, error=r.error,
                         stage=r.stage, width=None, height=None, n_prompt_tokens=None, n_new_tokens=None,
                         finish_reason=None, preprocess_s=None, encode_s=None, prefill_s=None, decode_s=None)
