"""config.json `model_type` -> model family loader (an explicit dict, no decorators)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path

import torch

from models.base import LoadedModel
from models.loading import CheckpointError, HeaderSource, read_config, safetensors_files

# model_type as written in the original checkpoints' config.json -> module with load()
FAMILIES: dict[str, str] = {
    "bunny-qwen2": "models.bunny",
    "minicpmv": "models.minicpmv2",
}
# the family module's config dataclass (from_dict(config.json)) and nn.Module built from it
CLASSES: dict[str, tuple[str, str]] = {
    "bunny-qwen2": ("BunnyConfig", "Bunny"),
    "minicpmv": ("MiniCPMV2Config", "MiniCPMV2"),
}


def family_of(model_dir: str | Path) -> str:
    mt = read_config(model_dir).get("model_type")
    if not isinstance(mt, str) or mt not in FAMILIES:
        raise CheckpointError(f"{model_dir}: model_type {str(mt)[:60]!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return mt


@dataclass(frozen=True)
class CheckpointInfo:
    """What check_checkpoint learnt about a checkpoint folder."""

    family: str                 # config.json model_type, a key of FAMILIES
    name: str                   # _name_or_path, for logs
    parameters: int             # values the architecture needs (the files may hold a few unused ones)
    weight_bytes: int           # bytes of the weight files on disk
    dtypes: tuple[str, ...]     # the stored dtypes of the tensors the model uses, e.g. ("BF16",)


def _family_config(model_dir: str | Path):
    """(family module, its parsed config); CheckpointError when config.json does not parse into it."""
    mt = family_of(model_dir)
    module = importlib.import_module(FAMILIES[mt])
    config_cls, _ = CLASSES[mt]
    try:
        return module, getattr(module, config_cls).from_dict(read_config(model_dir))
    except CheckpointError:
        raise
    except (TypeError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{model_dir}: config.json has a malformed value ({type(e).__name__}: {e})") from e


def check_checkpoint(model_dir: str | Path) -> CheckpointInfo:
    """Everything about a checkpoint folder that can be known without reading a weight.

    config.json against its family's schema (types, ranges, divisibility), then the safetensors
    headers against the architecture that config describes: the parameter count implied vs the
    values stored, then every tensor's name, shape and dtype (models/checkpoint_check.py). Takes
    milliseconds; a problem is one CheckpointError naming the field or tensor. Callers run it
    before they write anything, so a bad checkpoint cannot leave a run dir behind.
    """
    family = family_of(model_dir)
    module = importlib.import_module(FAMILIES[family])
    src = HeaderSource(model_dir)
    cfg, n = module.check(read_config(model_dir), src)
    files = safetensors_files(model_dir)
    return CheckpointInfo(family=family, name=cfg.name, parameters=n,
                          weight_bytes=sum(f.stat().st_size for f in files),
                          dtypes=tuple(sorted({src.dtype(t) for t in src.used})))


def context_length(model_dir: str | Path) -> int:
    """The most positions (prompt + new tokens) the checkpoint's decoder takes."""
    return int(_family_config(model_dir)[1].llm.max_position)


def load_frontend(model_dir: str | Path, template: str | None = None):
    """(image processor, prompt builder) of a checkpoint: for CPU workers. No weight is read, but
    the whole checkpoint is checked first (check_checkpoint): the frontend is the first thing
    every process builds from a checkpoint, so one that cannot load fails here, in one line,
    before a run dir is written, not after the workers have started.

    template: a prompt preset's template (None = the family default); exposed as prompts.template."""
    info = check_checkpoint(model_dir)
    return importlib.import_module(FAMILIES[info.family]).frontend(model_dir, template)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device, kernels=None) -> LoadedModel:
    """Load any supported checkpoint folder; the family is picked from config.json.

    kernels: the CPU fast paths to apply (a pipeline.device.CpuKernels: `.isa`, `.linear`,
    `.attention`), decided by the device module, the one place that knows devices; None = plain
    PyTorch. Where our kernels cannot be built here, the torch paths are kept (one warning) and
    `LoadedModel.kernels` says what actually runs.
    """
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    if kernels is None:
        loaded = module.load(model_dir, dtype, device)
        loaded.kernels = "torch"
        return loaded
    from models.kernels import build

    ops = build.load(kernels.isa) if "widening" == kernels.linear or kernels.attention == "kernel" else None
    linear = kernels.linear if (kernels.linear != "widening" or ops is not None) else "torch"
    attention = kernels.attention if ops is not None else "sdpa"
    loaded = module.load(model_dir, dtype, device, keep_stored_linears=linear == "widening")
    if linear == "widening":
        from models.kernels.linear import widen_linears
        counts = widen_linears(loaded.model, ops)
        linear = "widening (" + ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) + " weights)"
    elif linear == "onednn-bf16":
        from models.packed_linear import pack_linears
        if pack_linears(loaded.model) == 0:
            linear = "torch"
    if attention == "kernel":
        from models.kernels.attention import decode_attention
        loaded.model.llm.decode_attention = decode_attention(ops)
        attention = f"kernel ({kernels.isa})"
    loaded.kernels = f"linear {linear}, decode attention {attention}"
    return loaded
