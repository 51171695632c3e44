"""Strict weight loading from the original Hugging Face safetensors files.

A checkpoint folder is untrusted input: only safetensors are read (no pickle, no remote code),
config.json is parsed as plain JSON, and every tensor is accounted for. The model families give a
*name map* (checkpoint name -> our parameter name, or a fusion of several checkpoint tensors into
one parameter); `load_into` then checks that every parameter of the module received a tensor of
the right shape and that every checkpoint tensor was used, naming the first offender otherwise.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch
from safetensors import safe_open
from torch import nn

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint folder is missing, malformed or does not match the architecture."""


MAX_JSON_BYTES = 64 << 20      # config / tokenizer / index JSON files of real checkpoints are < 10 MB


def read_json_object(path: str | Path) -> dict:
    """A checkpoint's JSON file parsed as data (never code); CheckpointError if not a JSON object."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise CheckpointError(f"{path}: {path.stat().st_size} bytes, too large for a checkpoint JSON file")
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: not a JSON object")
    return d


def read_config(model_dir: str | Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{model_dir}: no config.json (is this a Hugging Face checkpoint folder?)")
    return read_json_object(path)


def safetensors_files(model_dir: str | Path) -> list[Path]:
    """The weight files of a checkpoint: model.safetensors or the shards named by the index."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = [model_dir / n for n in sorted(set(read_weight_map(index).values()))]
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")):
            raise CheckpointError(f"{model_dir}: only pickle weights (.bin/.pt) found; convert to safetensors "
                                  "(pickle files can execute code and are never loaded)")
        raise CheckpointError(f"{model_dir}: no *.safetensors weight file")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{model_dir}: weight shard {f.name} is missing")
    return files


def read_weight_map(index: Path) -> dict[str, str]:
    """model.safetensors.index.json's {tensor name: shard file name}, checked: every shard is a
    plain file name in the checkpoint folder itself."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: malformed safetensors index (weight_map must be a non-empty object "
                              "of tensor name -> file name)")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not file.endswith(".safetensors"):
            raise CheckpointError(f"{index}: malformed safetensors index (tensor {name} maps to {file!r}, "
                                  "not a .safetensors file name)")
        if "/" in file or "\\" in file or file.startswith("."):
            raise CheckpointError(f"{index}: refusing shard name outside the folder: {file!r}")
    return weight_map


# Weight dtypes the models can be cast from (safetensors header names). Integer or 8-bit float
# tensors would need a dequantisation no family here has, so they are refused by name.
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


class TensorSource:
    """Lazy, mmap-backed view of every tensor in a checkpoint; remembers what was read."""

    def __init__(self, model_dir: str | Path):
        self._handles = {}
        self._where: dict[str, object] = {}
        files: dict[str, str] = {}          # tensor name -> the file it is in
        for f in safetensors_files(model_dir):
            try:
                h = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{f}: not a valid safetensors file ({e})") from e
            self._handles[f] = h
            for k in h.keys():
                if k in self._where:
                    raise CheckpointError(f"{f.name}: tensor {k} appears in two weight files")
                self._where[k] = h
                files[k] = f.name
        index = Path(model_dir) / "model.safetensors.index.json"
        if index.is_file():
            # the index must describe the files: a tensor it places elsewhere, or one it omits,
            # means shards of different checkpoints were mixed
            weight_map = read_weight_map(index)
            for k, name in files.items():
                if weight_map.get(k) != name:
                    raise CheckpointError(f"{index}: malformed safetensors index (tensor {k} is in {name}, "
                                          f"the index says {weight_map.get(k)!r})")
            absent = sorted(weight_map.keys() - files.keys())
            if absent:
                raise CheckpointError(f"{index}: malformed safetensors index (it lists tensor {absent[0]}, "
                                      "which no weight file holds)")
        self.used: set[str] = set()

    def names(self) -> set[str]:
        return set(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def get(self, name: str) -> torch.Tensor:
        self._require_float(name)
        self.used.add(name)
        return self._where[name].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        return tuple(self._where[name].get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The header's dtype name ("BF16", "I32", ...)."""
        if name not in self._where:
            raise CheckpointError(f"checkpoint lacks tensor {name}")
        return self._where[name].get_slice(name).get_dtype()

    def _require_float(self, name: str) -> None:
        """Tensors that are read must be floats (ones a family skips by design may be anything)."""
        dtype = self.dtype(name)
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} has dtype {dtype}; weights must be one of "
                                  f"{', '.join(sorted(FLOAT_DTYPES))}")

    def n_elements(self) -> int:
        """Values stored in the weight files, from the headers alone."""
        return sum(math.prod(self.shape(n)) for n in self._where)


class HeaderSource(TensorSource):
    """A TensorSource that reads only the safetensors headers: get() returns a tensor on the meta
    device with the stored shape, so `load_into` checks names, shapes and dtypes of a checkpoint
    against an architecture built on meta without reading (or allocating) a single weight."""

    def get(self, name: str) -> torch.Tensor:
        self._require_float(name)
        self.used.add(name)
        return torch.empty(self.shape(name), device="meta")


@dataclass(frozen=True)
class Rule:
    """One parameter of ours built from one or more checkpoint tensors (concatenated on dim 0)."""

    target: str
    sources: tuple[str, ...]
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None


@dataclass
class NameMap:
    rules: list[Rule] = field(default_factory=list)
    ignored: set[str] = field(default_factory=set)  # present in the file but unused by design

    def add(self, target: str, *sources: str, transform=None) -> None:
        self.rules.append(Rule(target, tuple(sources), transform))

    def ignore(self, names: Iterable[str]) -> None:
        self.ignored.update(names)


STORED_16BIT = (torch.bfloat16, torch.float16)


def linear_weight_names(module: nn.Module) -> set[str]:
    """Names of the weights of the plain nn.Linear layers (the ones the widening GEMM replaces)."""
    return {f"{name}.weight" if name else "weight" for name, m in module.named_modules() if type(m) is nn.Linear}


def fuse(rule: Rule, parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate a fused parameter's checkpoint tensors on dim 0 (q|k|v, gate|up); parts that
    cannot stack (another width or rank) are a CheckpointError naming them."""
    shapes = [tuple(p.shape) for p in parts]
    if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
        raise CheckpointError(f"tensors {' + '.join(rule.sources)} have shapes {', '.join(map(str, shapes))}, "
                              "which do not stack into one parameter")
    return torch.cat(parts, dim=0)


def load_into(module: nn.Module, src: TensorSource, name_map: NameMap, dtype: torch.dtype,
              device: torch.device | str = "cpu", keep_stored: set[str] | None = None) -> set[str]:
    """Fill `module` (built on the meta device or not) from `src`; strict both ways.

    Returns the set of checkpoint names that were loaded. Floating tensors are cast to `dtype`,
    except the parameters named in `keep_stored` when `dtype` is fp32 and the checkpoint stores
    them in bf16/fp16: those keep the stored dtype (the widening GEMM computes with them in fp32;
    models/kernels/linear.py), which halves their memory and is exact.
    """
    params = dict(module.named_parameters())
    params.update(dict(module.named_buffers()))
    state: dict[str, torch.Tensor] = {}
    for rule in name_map.rules:
        if rule.target not in params:
            raise CheckpointError(f"internal name map targets unknown parameter {rule.target}")
        parts = [src.get(s) for s in rule.sources]
        t = parts[0] if len(parts) == 1 else fuse(rule, parts)
        if rule.transform is not None:
            t = rule.transform(t)
        want = tuple(params[rule.target].shape)
        if tuple(t.shape) != want:
            raise CheckpointError(f"tensor {'+'.join(rule.sources)} has shape {tuple(t.shape)}, "
                                  f"the architecture from config.json expects {want}")
        keep = (keep_stored is not None and rule.target in keep_stored and dtype == torch.float32
                and t.dtype in STORED_16BIT)
        if t.is_floating_point() and not keep:
            t = t.to(dtype)
        state[rule.target] = t.to(device).contiguous()
    missing = [n for n, p in module.named_parameters() if n not in state]
    if missing:
        raise CheckpointError(f"no checkpoint tensor for parameter {missing[0]} ({len(missing)} missing)")
    unused = sorted(src.names() - src.used - name_map.ignored)
    if unused:
        raise CheckpointError(f"checkpoint tensor {unused[0]} is not used by the architecture "
                              f"({len(unused)} unused; wrong config.json or model family?)")
    module.load_state_dict(state, strict=False, assign=True)
    # Non-persistent buffers built on meta (none should be) would remain meta: catch that early.
    for n, b in module.named_buffers():
        if b.is_meta:
            raise CheckpointError(f"internal: buffer {n} was never materialised")
    log.debug("loaded %d tensors", len(src.used))
    return set(src.used)
