"""Write a random-weight checkpoint with the REAL full-size dims in the original HF format.

No real weights can be downloaded here, and speed never depends on weight values at a fixed token
count, so benchmarks and full-size smoke tests run on these. The folder looks like the hub's
(config.json with the original keys, model.safetensors with the original tensor names and dtype);
the tokenizer files are the tiny golden ones (real vocabularies are not redistributable here), so
the text is meaningless and ids beyond the tiny vocabulary decode to nothing.

Values: matrices N(0, 0.02), norm weights 1, biases 0 — activations stay finite in bf16/fp16.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.base import dtype_name

log = logging.getLogger(__name__)

TESTS_GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden"

# config.json of BAAI/Bunny-v1_0-2B-zh (docs/bunny.md §2.1: verbatim head + reconstructed tail)
BUNNY_CONFIG = {
    "_name_or_path": "BAAI/Bunny-v1_0-2B (random weights)", "architectures": ["BunnyQwen2ForCausalLM"],
    "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643, "hidden_act": "silu",
    "hidden_size": 2048, "image_aspect_ratio": "pad", "initializer_range": 0.02, "intermediate_size": 5504,
    "max_position_embeddings": 32768, "max_window_layers": 21, "mm_hidden_size": 1152,
    "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "google/siglip-so400m-patch14-384",
    "model_type": "bunny-qwen2", "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 16,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": False,
    "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "torch_dtype": "float16",
    "transformers_version": "4.38.2", "use_cache": True, "use_mm_proj": True, "use_sliding_window": False,
    "vocab_size": 151646,
}

# config.json of openbmb/MiniCPM-V-2 (docs/minicpmv2.md §1.1)
MINICPMV2_CONFIG = {
    "_name_or_path": "openbmb/MiniCPM-V-2 (random weights)", "architectures": ["MiniCPMV"],
    "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    "dim_model_base": 256, "drop_vision_last_layer": True, "hidden_act": "silu", "hidden_size": 2304,
    "image_size": 448, "initializer_range": 0.1, "intermediate_size": 5760, "max_position_embeddings": 4096,
    "max_slice_nums": 9, "mm_use_im_start_end": True, "model_type": "minicpmv", "num_attention_heads": 36,
    "num_hidden_layers": 40, "num_key_value_heads": 36, "patch_size": 14, "pretraining_tp": 1, "query_num": 64,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "scale_depth": 1.4, "scale_emb": 12,
    "scale_resolution": 448, "slice_mode": True, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0", "use_cache": True, "vision_encoder": "vit_so400m_patch14_siglip_384.webli",
    "vocab_size": 122753,
}

@dataclass(frozen=True)
class RandomSpec:
    module: str             # the family module (has name_map(cfg), optionally checkpoint_shapes(cfg))
    config_cls: str         # its config dataclass with from_dict(config.json dict)
    model_cls: str          # its nn.Module, built from that config
    config: dict            # the real config.json
    golden: str             # tests/golden/<golden>/checkpoint provides the tokenizer files
    dtype: torch.dtype      # the original checkpoint's dtype


FAMILIES = {
    "bunny": RandomSpec("models.bunny", "BunnyConfig", "Bunny", BUNNY_CONFIG, "bunny-tiny", torch.float16),
    "minicpmv2": RandomSpec("models.minicpmv2", "MiniCPMV2Config", "MiniCPMV2", MINICPMV2_CONFIG, "minicpmv2-tiny",
                            torch.bfloat16),
}
TOKENIZER_FILES = ("vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json")


def checkpoint_shapes(family: str) -> dict[str, tuple[int, ...]]:
    """Original tensor name -> shape, derived from the family's own name map and module shapes.

    A family may define `checkpoint_shapes(cfg)` itself (when its map reshapes tensors); otherwise a
    parameter fused from k checkpoint tensors is split evenly along dim 0 (q|k|v, gate|up).
    """
    import importlib

    spec = FAMILIES[family]
    mod = importlib.import_module(spec.module)
    cfg = getattr(mod, spec.config_cls).from_dict(spec.config)
    if hasattr(mod, "checkpoint_shapes"):
        return dict(mod.checkpoint_shapes(cfg))
    with torch.device("meta"):
        model = getattr(mod, spec.model_cls)(cfg)
    params = dict(model.named_parameters())
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in mod.name_map(cfg).rules:
        full = tuple(params[rule.target].shape)
        k = len(rule.sources)
        if full[0] % k:
            raise ValueError(f"cannot split {rule.target} {full} into {k} sources")
        for s in rule.sources:
            shapes[s] = (full[0] // k, *full[1:])
    return shapes


def _value(name: str, shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or ".ln_" in name or name.startswith("resampler.ln") or "layernorm" in name:
        return torch.ones(shape, dtype=dtype) if leaf == "weight" else torch.zeros(shape, dtype=dtype)
    if leaf == "bias" or leaf.endswith("_bias"):
        return torch.zeros(shape, dtype=dtype)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * 0.02).to(dtype)


def write_random_checkpoint(family: str, out_dir: str | Path, dtype: torch.dtype | None = None,
                            seed: int = 0) -> Path:
    """Write <out_dir>/{config.json, model.safetensors, tokenizer files}; returns out_dir.

    Skips the work when a complete checkpoint of the same family is already there.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    spec = FAMILIES[family]
    config, dtype = spec.config, dtype or spec.dtype
    out = Path(out_dir)
    done = out / ".complete"
    if done.is_file() and json.loads(done.read_text()) == {"family": family, "dtype": str(dtype), "seed": seed}:
        log.info("random %s checkpoint already at %s", family, out)
        return out
    out.mkdir(parents=True, exist_ok=True)
    shapes = checkpoint_shapes(family)
    g = torch.Generator().manual_seed(seed)
    tensors = {n: _value(n, s, dtype, g) for n, s in sorted(shapes.items())}
    n_params = sum(t.numel() for t in tensors.values())
    log.info("writing random %s checkpoint: %d tensors, %.2fB params, %s", family, len(tensors), n_params / 1e9, dtype)
    tmp = out / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name(dtype)},
                                                indent=2))
    src = TESTS_GOLDEN / spec.golden / "checkpoint"
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    gen = out / "generation_config.json"
    if gen.is_file():  # the real eos/bos ids, not the tiny tokenizer's
        gen.write_text(json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]}))
    done.write_text(json.dumps({"family": family, "dtype": str(dtype), "seed": seed}))
    return out
