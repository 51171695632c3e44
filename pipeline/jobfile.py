"""TOML job files, and turning options (job file + flags) into a checked RunConfig.

    # nightly.toml
    manifest = "lists/today.txt"       # relative paths: against this file's folder
    model = "/models/Bunny-v1_0-2B-zh"
    out = "runs/today"
    max-new-tokens = 128
    quiet = true

Keys are the long flag names (`max-new-tokens` or `max_new_tokens`). Flags given on the command
line override the file; anything in neither takes its default. Unknown keys and wrong types are
errors naming the key, so a typo cannot silently fall back to a default. The table of keys is
not written here: it is derived from the option declarations in pipeline/config.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import tomllib
from pathlib import Path
from typing import Any

from pipeline import array_task
from pipeline.config import ArraySlice, Declared, RunConfig, check_value, declared
from pipeline.errors import JobError

OPTIONS: dict[str, Declared] = {d.name: d for d in declared()}
ALIASES: dict[str, str] = {a: d.name for d in OPTIONS.values() for a in d.option.aliases}
ACCEPTS: dict[type, tuple[type, ...]] = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}


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
        d = OPTIONS[name]
        types = ACCEPTS[d.type]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            want = " or ".join(t.__name__ for t in types)
            raise JobError(f"job file {p}: {key} must be {want}, not {type(value).__name__} ({value!r})")
        if name in out:
            raise JobError(f"job file {p}: {key} is given twice (alias of {name})")
        if d.option.path and not os.path.isabs(os.path.expanduser(value)):
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


def _build(cls: type, prefix: tuple[str, ...], values: dict[tuple[str, ...], Any]) -> Any:
    """cls(...) from the given option values (by target path); the rest keep their defaults."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        target = prefix + (f.name,)
        if target in values:
            kwargs[f.name] = values[target]
        elif dataclasses.is_dataclass(f.default):
            kwargs[f.name] = _build(type(f.default), target, values)
    return cls(**kwargs)


def to_run_config(opts: dict[str, Any], part: ArraySlice, config_file: str | None = None,
                  optional: tuple[str, ...] = ()) -> RunConfig:
    """Merged options -> RunConfig, with every check that needs no model: a mistake that would
    spoil the whole run is refused here, in one line, before anything is written. Required options
    named in `optional` may be left out (`pipeline plan` needs no --model): they are then ""."""
    values: dict[tuple[str, ...], Any] = {}
    for name, value in opts.items():
        d = OPTIONS.get(_canonical(name))
        if d is None:
            raise JobError(f"unknown option {name!r}")
        if value is None:
            continue
        value = float(value) if d.type is float else value
        why = check_value(d, value)
        if why:
            raise JobError(why)
        values[d.target] = value
    for d in OPTIONS.values():
        if d.required and d.target not in values:
            if d.name not in optional:
                raise JobError(f"{d.flag} is required (on the command line or in the --config job file)")
            values[d.target] = ""
    if opts.get("overwrite") and opts.get("retry_failed"):
        raise JobError("--overwrite and --retry-failed contradict each other; pick one")
    values = {t: v for t, v in values.items() if t[0] != "array"}       # the slice comes resolved
    return dataclasses.replace(_build(RunConfig, (), values), array=part, config_file=config_file)


def run_config(opts: dict[str, Any], config_file: str | None = None, env: dict[str, str] | None = None,
               optional: tuple[str, ...] = ()) -> RunConfig:
    """to_run_config with the array slice resolved from the options and the scheduler's environment."""
    part = array_task.resolve(opts.get("num_shards_total"), opts.get("shard_index"), env)
    return to_run_config(opts, part, config_file, optional)
