"""config.json `model_type` -> model family loader (an explicit dict, no decorators)."""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import torch

from models.base import LoadedModel
from models.loading import CheckpointError, TensorSource, read_config

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
    if mt not in FAMILIES:
        raise CheckpointError(f"{model_dir}: model_type {mt!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return mt


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


def check_checkpoint(model_dir: str | Path) -> None:
    """What can be checked before a run commits to a checkpoint, without reading a weight: config.json
    parses into the family's config, and every tensor the architecture needs is in the safetensors
    headers with the element count config.json implies. CheckpointError names the first problem.
    (Loading stays strict on its own: tensors the architecture does not use are refused there.)"""
    module, cfg = _family_config(model_dir)
    with torch.device("meta"):                       # shapes only: no memory, no initialisation
        model = getattr(module, CLASSES[family_of(model_dir)][1])(cfg)
    params = dict(model.named_parameters())
    src = TensorSource(model_dir)
    for rule in module.name_map(cfg).rules:
        have = sum(math.prod(src.shape(name)) for name in rule.sources)     # CheckpointError if absent
        want = params[rule.target]
        if have != want.numel():
            shapes = ", ".join(f"{n} {src.shape(n)}" for n in rule.sources)
            raise CheckpointError(f"{model_dir}: tensor {shapes} does not fit the architecture from config.json "
                                  f"(expects {tuple(want.shape)} in all)")


def context_length(model_dir: str | Path) -> int:
    """The most positions (prompt + new tokens) the checkpoint's decoder takes."""
    return int(_family_config(model_dir)[1].llm.max_position)


def load_frontend(model_dir: str | Path, template: str | None = None):
    """(image processor, prompt builder) of a checkpoint, without weights: for CPU workers.

    template: a prompt preset's template (None = the family default); exposed as prompts.template."""
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    return module.frontend(model_dir, template)


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
