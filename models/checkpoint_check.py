"""What a checkpoint folder must hold for its config.json, checked from the safetensors headers
alone (no weight is read): used by models.registry.check_checkpoint before anything is built.

Two steps, cheapest first:
1. parameter count: the count the config implies (closed formulas below, equal to the built
   modules' numel, see tests/test_checkpoint_check.py) against the values stored on disk. A config
   that asks for more than twice what the files hold (`num_hidden_layers: 200` over a 2-layer
   checkpoint) stops here, before its modules are even built on the meta device. Closer than
   that, step 2 names the first tensor that differs, which says more than a count.
2. tensors: the architecture is built on the meta device and `load_into` runs against a
   HeaderSource, so the very checks of a real load (every parameter fed, every tensor used,
   shapes, float dtypes) run on shapes only.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from models.decoder import DecoderConfig
from models.loading import CheckpointError, HeaderSource, NameMap, load_into
from models.vit import ViTConfig


def decoder_parameters(c: DecoderConfig) -> int:
    """Values in the llama-family decoder's weights (embeddings, layers, final norm, lm_head)."""
    h, d = c.hidden_size, c.head_dim
    q, kv = c.n_heads * d, c.n_kv_heads * d
    attn = h * (q + 2 * kv) + (q + 2 * kv if c.qkv_bias else 0) + q * h
    mlp = 3 * h * c.intermediate_size
    per_layer = attn + mlp + 2 * h                                   # + two RMSNorm weights
    return 2 * c.vocab_size * h + c.n_layers * per_layer + h


def vit_parameters(c: ViTConfig) -> int:
    """Values in the ViT's weights (patch conv, position table, blocks, optional final norm)."""
    w, m = c.width, c.mlp_dim
    block = (3 * w * w + 3 * w) + (w * w + w) + 4 * w + (w * m + m) + (m * w + w)
    patch = w * c.channels * c.patch * c.patch + w
    return patch + c.grid * c.grid * w + c.depth * block + (2 * w if c.final_norm else 0)


def check_weights(expected: int, llm: DecoderConfig, vit: ViTConfig, src: HeaderSource,
                  build: Callable[[], nn.Module], name_map: NameMap) -> None:
    """Step 1 then step 2 (module docstring). expected: the family's parameter count for its
    config; build: makes the architecture (called under the meta device)."""
    stored = src.n_elements()
    # The files may also hold more than implied (tensors a family skips by design, such as
    # Bunny's dropped 27th SigLIP layer): only a config far beyond the files stops here.
    if expected > 2 * stored:
        raise CheckpointError(
            f"config.json implies {expected:,} parameters (num_hidden_layers {llm.n_layers}, hidden_size "
            f"{llm.hidden_size}, intermediate_size {llm.intermediate_size}, vocab_size {llm.vocab_size}, a "
            f"{vit.depth}-layer vision tower of width {vit.width}) but the weight files hold {stored:,} values")
    with torch.device("meta"):
        module = build()
    load_into(module, src, name_map, dtype=torch.float32, device="meta")
