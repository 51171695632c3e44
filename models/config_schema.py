"""Typed, range-checked reading of an untrusted config.json.

Every value a model family takes from config.json goes through `Fields`, so a wrong type, an
absurd size or a zero divisor is one CheckpointError naming the field
(`config.json: vision_config.patch_size must be an integer in [1, 384], got 0`) instead of a
traceback, a division by zero per image, or minutes of allocation while a million layers are
built. A JSON null counts as "not given" for fields that have a default (HF configs write
`"rope_scaling": null`), and as an error for required fields.

The families (models/bunny.py, models/minicpmv2.py) declare their ranges next to their config
dataclasses; the limits shared by both are here.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from models.decoder import DecoderConfig
from models.loading import CheckpointError

# Sizes far above any released model of these families (2-3B parameters: hidden 2048-2304,
# 24-40 layers, vocab 122k-152k) but small enough that a config inside them cannot make the
# loader build or allocate for minutes before the weights are compared (models/registry.py
# check_checkpoint then compares the implied parameter count with the bytes on disk).
MAX_VOCAB = 1 << 20
MAX_HIDDEN = 1 << 16
MAX_LAYERS = 256
MAX_HEADS = 1024
MAX_INTERMEDIATE = 1 << 18
MAX_POSITIONS = 1 << 18        # RoPE tables are [positions, head_dim] fp32: 128 MiB at head_dim 128
MAX_IMAGE_SIDE = 4096          # vision input side in pixels (384 and 448 in the released models)

_MISSING = object()


def _shown(value: Any) -> str:
    """A value as it appears in the JSON, cut short (a hostile file may hold megabytes)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class Fields:
    """Checked access to one JSON object of config.json (the top level or a nested one)."""

    def __init__(self, data: Any, prefix: str = "", source: str = "config.json"):
        if not isinstance(data, dict):
            what = prefix.rstrip(".") or "the file"
            raise CheckpointError(f"{source}: {what} must be a JSON object, got {_shown(data)}")
        self.data, self.prefix, self.source = data, prefix, source

    def _error(self, name: str, want: str, value: Any) -> CheckpointError:
        return CheckpointError(f"{self.source}: {self.prefix}{name} must be {want}, got {_shown(value)}")

    def _get(self, name: str, default: Any, want: str) -> Any:
        value = self.data.get(name)
        if value is None:
            if default is _MISSING:
                raise self._error(name, want, value) if name in self.data else CheckpointError(
                    f"{self.source}: {self.prefix}{name} is missing ({want} is needed)")
            return default
        return value

    def integer(self, name: str, lo: int, hi: int, default: Any = _MISSING) -> int:
        want = f"an integer in [{lo}, {hi}]"
        value = self._get(name, default, want)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self._error(name, want, value)
        return value

    def number(self, name: str, lo: float, hi: float, default: Any = _MISSING, *, open_low: bool = False) -> float:
        """A finite number in [lo, hi] (or (lo, hi] with open_low: epsilons, scales)."""
        want = f"a number in {'(' if open_low else '['}{lo:g}, {hi:g}]"
        value = self._get(name, default, want)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self._error(name, want, value)
        if value > hi or value < lo or (open_low and value == lo):
            raise self._error(name, want, value)
        return float(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self._get(name, default, "true or false")
        if not isinstance(value, bool):
            raise self._error(name, "true or false", value)
        return value

    def string(self, name: str, default: Any = _MISSING, choices: Sequence[str] | None = None) -> str:
        want = "one of " + ", ".join(repr(c) for c in choices) if choices else "a string"
        value = self._get(name, default, want)
        if not isinstance(value, str) or (choices is not None and value not in choices):
            raise self._error(name, want, value)
        return value

    def token_id(self, name: str, vocab: int, default: Any = _MISSING) -> int:
        """An id below `vocab`, or a non-empty list of them (the first is used, as generate() stops on any)."""
        want = f"a token id in [0, {vocab - 1}] or a non-empty list of them"
        value = self._get(name, default, want)
        ids = value if isinstance(value, list) else [value]
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in ids):
            raise self._error(name, want, value)
        return ids[0]

    def nested(self, name: str) -> "Fields | None":
        """A nested object (e.g. vision_config), or None when it is absent or null."""
        value = self.data.get(name)
        return None if value is None else Fields(value, f"{self.prefix}{name}.", self.source)

    def require(self, ok: bool, message: str) -> None:
        """A rule between fields (divisibility, ordering); the message names them."""
        if not ok:
            raise CheckpointError(f"{self.source}: {message}")


def heads_divide(f: Fields, width_name: str, width: int, heads_name: str, heads: int) -> None:
    """Attention splits `width` into `heads` equal slices."""
    f.require(width % heads == 0, f"{f.prefix}{width_name} {width} is not divisible by "
                                  f"{f.prefix}{heads_name} {heads}")


def read_decoder(f: Fields, *, rms_eps: float, rope_theta: float, max_position: int, min_position: int,
                 **knobs: Any) -> DecoderConfig:
    """The llama-family LLM fields both families share; `knobs` are the family's fixed choices
    (qkv bias, muP scales, fp32 RoPE). min_position: the family's longest prompt must fit."""
    hidden = f.integer("hidden_size", 1, MAX_HIDDEN)
    heads = f.integer("num_attention_heads", 1, MAX_HEADS)
    heads_divide(f, "hidden_size", hidden, "num_attention_heads", heads)
    f.require((hidden // heads) % 2 == 0, f"head size hidden_size / num_attention_heads = {hidden // heads} "
                                          "must be even (rotary embedding rotates halves)")
    kv_heads = f.integer("num_key_value_heads", 1, heads, default=heads)
    f.require(heads % kv_heads == 0, f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    return DecoderConfig(
        vocab_size=f.integer("vocab_size", 1, MAX_VOCAB), hidden_size=hidden,
        n_layers=f.integer("num_hidden_layers", 1, MAX_LAYERS), n_heads=heads, n_kv_heads=kv_heads,
        intermediate_size=f.integer("intermediate_size", 1, MAX_INTERMEDIATE),
        rms_eps=f.number("rms_norm_eps", 0.0, 1.0, rms_eps, open_low=True),
        rope_theta=f.number("rope_theta", 0.0, 1e12, rope_theta, open_low=True),
        max_position=f.integer("max_position_embeddings", min_position, MAX_POSITIONS, max_position), **knobs)
