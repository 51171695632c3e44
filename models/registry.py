"""config.json `model_type` -> model family loader (an explicit dict, no decorators)."""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from models.base import LoadedModel
from models.loading import CheckpointError, read_config

# model_type as written in the original checkpoints' config.json -> module with load()
FAMILIES: dict[str, str] = {
    "bunny-qwen2": "models.bunny",
    "minicpmv": "models.minicpmv2",
}


def family_of(model_dir: str | Path) -> str:
    mt = read_config(model_dir).get("model_type")
    if mt not in FAMILIES:
        raise CheckpointError(f"{model_dir}: model_type {mt!r} is not supported "
                              f"(supported: {', '.join(sorted(FAMILIES))})")
    return mt


def load_frontend(model_dir: str | Path, template: str | None = None):
    """(image processor, prompt builder) of a checkpoint, without weights: for CPU workers.

    template: a prompt preset's template (None = the family default); exposed as prompts.template."""
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    return module.frontend(model_dir, template)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               cpu_kernels: bool = False) -> LoadedModel:
    """Load any supported checkpoint folder; the family is picked from config.json.

    cpu_kernels: the CPU bf16 fast paths — Linear weights reordered into oneDNN's layout and the
    compiled decode-attention kernel (each skipped, with a log line, where unavailable). The
    caller decides with pipeline.device.prefers_cpu_kernels, the one place that knows devices.
    """
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    loaded = module.load(model_dir, dtype, device)
    if cpu_kernels:
        from models import decode_attention
        from models.packed_linear import pack_linears
        pack_linears(loaded.model)
        if decode_attention.load() is not None:
            loaded.model.llm.decode_attention = decode_attention.decode_attention
    return loaded
