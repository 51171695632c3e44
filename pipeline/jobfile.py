"""TOML job files: every `caption` option can live in a file so a cron line stays short.

    # nightly.toml
    manifest = "lists/today.txt"       # relative paths: against this file's folder
    model = "/models/Bunny-v1_0-2B-zh"
    out = "runs/today"
    max-new-tokens = 128
    quiet = true

Keys are the long flag names (`max-new-tokens` or `max_new_tokens`). Flags given on the command
line override the file; anything in neither takes its default. Unknown keys and wrong types are
errors naming the key, so a typo cannot silently fall back to a default.
"""

from __future__ import annotations

import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline.config import (DEFAULT_SHARD_SIZE, ArraySlice, DecodeConfig, ImageLimits,
                             RunConfig)
from pipeline.errors import JobError

# option -> (accepted Python types, is a path resolved against the job file's folder)
OPTIONS: dict[str, tuple[tuple[type, ...], bool]] = {
    "manifest": ((str,), True), "model": ((str,), True), "out": ((str,), True),
    "prompt": ((str,), False), "prompt_preset": ((str,), False),
    "max_new_tokens": ((int,), False), "dtype": ((str,), False), "device": ((str,), False),
    "batch_size": ((int,), False), "memory_budget": ((int, float), False),
    "shard_size": ((int,), False), "overwrite": ((bool,), False), "retry_failed": ((bool,), False),
    "num_shards_total": ((int,), False), "shard_index": ((int,), False),
    "engine": ((str,), False), "ray_address": ((str,), False), "ray_actors": ((int,), False),
    "temperature": ((int, float), False), "top_p": ((int, float), False), "top_k": ((int,), False),
    "repetition_penalty": ((int, float), False), "seed": ((int,), False), "ignore_eos": ((bool,), False),
    "threads": ((int,), False), "quiet": ((bool,), False), "workers": ((int,), False),
    "max_image_pixels": ((int,), False), "max_aspect_ratio": ((int, float), False),
    "max_image_seconds": ((int, float), False),
}
ALIASES = {"max_batch_size": "batch_size"}


def _canonical(key: str) -> str:
    k = key.replace("-", "_")
    return ALIASES.get(k, k)


def read_jobfile(path: str | os.PathLike) -> dict[str, Any]:
    """The file's options, checked and with relative paths made absolute."""
    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JobError(f"job file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JobError(f"cannot read job file {p}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise JobError(f"job file {p} is not valid TOML: {e}") from None
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = _canonical(key)
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            hint = f" (did you mean {close[0].replace('_', '-')!r}?)" if close else ""
            raise JobError(f"job file {p}: unknown option {key!r}{hint}")
        types, is_path = OPTIONS[name]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise JobError(f"job file {p}: {key} must be {want}, not {type(value).__name__} ({value!r})")
        if name in out:
            raise JobError(f"job file {p}: {key} is given twice (alias of {name})")
        if is_path and not os.path.isabs(os.path.expanduser(value)):
            value = os.path.normpath(os.path.join(p.parent.resolve(), value))
        out[name] = value
    return out


def merge(job: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """Flags override the job file; a flag left unset (None) does not."""
    out = dict(job)
    for key, value in cli.items():
        if value is not None:
            out[_canonical(key)] = value
    return out


def _positive(opts: dict[str, Any], name: str) -> None:
    v = opts.get(name)
    if v is not None and v < 1:
        raise JobError(f"--{name.replace('_', '-')} must be at least 1 (got {v})")


def to_run_config(opts: dict[str, Any], part: ArraySlice, config_file: str | None = None) -> RunConfig:
    """Merged options -> RunConfig, with the value checks that need no model."""
    for need in ("manifest", "model", "out"):
        if not opts.get(need):
            raise JobError(f"--{need} is required (on the command line or in the --config job file)")
    for name in ("max_new_tokens", "batch_size", "shard_size", "threads", "max_image_pixels", "ray_actors"):
        _positive(opts, name)
    if opts.get("workers") is not None and opts["workers"] < 0:
        raise JobError("--workers must be 0 (preprocess in the main process) or more")
    engine = opts.get("engine") or "local"
    if engine not in ("local", "ray"):
        raise JobError(f"--engine must be local or ray (got {engine!r})")
    if opts.get("overwrite") and opts.get("retry_failed"):
        raise JobError("--overwrite and --retry-failed contradict each other; pick one")
    temperature = float(opts.get("temperature") or 0.0)
    top_p = float(opts["top_p"]) if opts.get("top_p") is not None else 1.0
    if temperature < 0 or not 0 < top_p <= 1:
        raise JobError("--temperature must be >= 0 and --top-p in (0, 1]")
    decode = DecodeConfig(max_new_tokens=int(opts.get("max_new_tokens") or DecodeConfig.max_new_tokens),
                          temperature=temperature, top_p=top_p, top_k=int(opts.get("top_k") or 0),
                          repetition_penalty=float(opts.get("repetition_penalty") or 1.0),
                          seed=int(opts.get("seed") or 0), ignore_eos=bool(opts.get("ignore_eos")))
    seconds = opts.get("max_image_seconds")
    if seconds is not None and not 0 < seconds < float("inf"):
        raise JobError(f"--max-image-seconds must be a positive number of seconds (got {seconds})")
    limits = ImageLimits(max_pixels=int(opts.get("max_image_pixels") or ImageLimits.max_pixels),
                         max_aspect_ratio=float(opts.get("max_aspect_ratio") or ImageLimits.max_aspect_ratio),
                         max_seconds=float(seconds or ImageLimits.max_seconds))
    return RunConfig(manifest=str(opts["manifest"]), model=str(opts["model"]), out=str(opts["out"]),
                     prompt=opts.get("prompt"), prompt_preset=opts.get("prompt_preset"),
                     decode=decode, dtype=opts.get("dtype") or "auto", device=opts.get("device") or "auto",
                     max_batch_size=opts.get("batch_size"), memory_budget_gib=opts.get("memory_budget"),
                     shard_size=int(opts.get("shard_size") or DEFAULT_SHARD_SIZE),
                     overwrite=bool(opts.get("overwrite")), retry_failed=bool(opts.get("retry_failed")),
                     array=part, engine=engine, ray_address=opts.get("ray_address"), ray_actors=opts.get("ray_actors"),
                     threads=opts.get("threads"),
                     quiet=bool(opts.get("quiet")), workers=opts.get("workers"), limits=limits,
                     config_file=config_file)
