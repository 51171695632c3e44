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


def load_frontend(model_dir: str | Path):
    """(image processor, prompt builder) of a checkpoint, without weights: for CPU workers."""
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    return module.frontend(model_dir)


def load_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
               pack_linears: bool = False) -> LoadedModel:
    """Load any supported checkpoint folder; the family is picked from config.json.

    pack_linears: reorder bf16 Linear weights into oneDNN's layout (CPU fast path; the caller
    decides with pipeline.device.prefers_packed_linear, the one place that knows devices).
    """
    module = importlib.import_module(FAMILIES[family_of(model_dir)])
    loaded = module.load(model_dir, dtype, device)
    if pack_linears:
        from models.packed_linear import pack_linears as pack
        pack(loaded.model)
    return loaded
