"""Baseline for `pipeline bench`: the same checkpoint run the way the reference GPU scripts do.

One image at a time, vision with the library modules the reference builds on (transformers'
SiglipVisionModel for Bunny; timm's VisionTransformer for MiniCPM-V-2, one slice at a time),
then transformers' `generate` on its own decoder modules with a dynamic KV cache, greedy, EOS
ignored (min_new_tokens = max_new_tokens). Only the LLM classes differ from the remote code:
Qwen2ForCausalLM is what Bunny's remote code subclasses; MiniCPM's muP scales are folded into a
LlamaForCausalLM's weights (x scale_emb is already in the prefill embeddings we pass; residual
scale into o_proj/down_proj; 1/logit_divisor into lm_head) which is the same math.

Used only for measuring; weights are copied out of our already-loaded model (no second read).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
from torch import nn

from models.base import LoadedModel, PixelInputs
from models.kernels.linear import WideningLinear
from models.packed_linear import PackedLinear

log = logging.getLogger(__name__)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Our parameters by name, with packed Linear weights unpacked back to dense [out, in] (in the
    width they are stored in; the callers cast to the compute dtype)."""
    out = {}
    for name, mod in module.named_modules():
        if isinstance(mod, PackedLinear):
            out[f"{name}.weight"] = mod.packed.to_dense() if mod.packed.is_mkldnn else mod.packed
        elif isinstance(mod, WideningLinear):
            out[f"{name}.weight"] = mod.dense_weight()
        else:
            continue
        if mod.bias is not None:
            out[f"{name}.bias"] = mod.bias.detach()
    for name, p in module.named_parameters():
        out.setdefault(name, p.detach())
    return out


def _hf_decoder(llm, family: str, dtype: torch.dtype) -> nn.Module:
    """transformers' own decoder module carrying our weights (names mapped back, fusions split)."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    c = llm.cfg
    common = dict(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads, num_key_value_heads=c.n_kv_heads,
                  rms_norm_eps=c.rms_eps, max_position_embeddings=c.max_position, tie_word_embeddings=False,
                  rope_theta=c.rope_theta)
    if family == "bunny":
        hf_cfg, cls = Qwen2Config(**common), Qwen2ForCausalLM
    else:
        hf_cfg, cls = LlamaConfig(**common, attention_bias=False, mlp_bias=False), LlamaForCausalLM
    hf_cfg._attn_implementation = "sdpa"
    ours = _state(llm)
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": ours["embed_tokens.weight"],
                                   "model.norm.weight": ours["norm.weight"]}
    lm_head = ours["lm_head.weight"]
    if c.logit_divisor != 1.0:
        lm_head = (lm_head.float() / c.logit_divisor).to(dtype)
    sd["lm_head.weight"] = lm_head
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    for i in range(c.n_layers):
        p, h = f"layers.{i}.", f"model.layers.{i}."
        for part, t in zip("qkv", ours[p + "attn.qkv.weight"].split([q, kv, kv])):
            sd[h + f"self_attn.{part}_proj.weight"] = t
        if c.qkv_bias:
            for part, t in zip("qkv", ours[p + "attn.qkv.bias"].split([q, kv, kv])):
                sd[h + f"self_attn.{part}_proj.bias"] = t
        o, down = ours[p + "attn.o.weight"], ours[p + "mlp.down.weight"]
        if c.residual_scale != 1.0:
            o = (o.float() * c.residual_scale).to(dtype)
            down = (down.float() * c.residual_scale).to(dtype)
        sd[h + "self_attn.o_proj.weight"] = o
        sd[h + "mlp.down_proj.weight"] = down
        gate, up = ours[p + "mlp.gate_up.weight"].chunk(2)
        sd[h + "mlp.gate_proj.weight"], sd[h + "mlp.up_proj.weight"] = gate, up
        sd[h + "input_layernorm.weight"] = ours[p + "input_norm.weight"]
        sd[h + "post_attention_layernorm.weight"] = ours[p + "post_norm.weight"]
    with torch.device("meta"):
        model = cls(hf_cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=False, assign=True)
    # rotary inv_freq buffers were created on meta: rebuild the rotary module on the CPU
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)
    missing = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if missing:
        raise RuntimeError(f"baseline decoder: unfilled {missing[:3]}")
    return model.eval()


def _hf_siglip(vision, dtype: torch.dtype) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    c = vision.cfg
    cfg = SiglipVisionConfig(hidden_size=c.width, intermediate_size=c.mlp_dim, num_hidden_layers=c.depth,
                             num_attention_heads=c.heads, image_size=c.grid * c.patch, patch_size=c.patch,
                             layer_norm_eps=c.eps, hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    cfg._attn_implementation = "eager"   # the reference SigLIP code: eager, fp32 softmax
    ours = _state(vision)
    sd = {"embeddings.patch_embedding.weight": ours["patch_embed.weight"],
          "embeddings.patch_embedding.bias": ours["patch_embed.bias"],
          "embeddings.position_embedding.weight": ours["pos_embed"]}
    for j in range(c.depth):
        p, h = f"blocks.{j}.", f"encoder.layers.{j}."
        for t in ("weight", "bias"):
            for part, x in zip("qkv", ours[p + f"qkv.{t}"].chunk(3)):
                sd[h + f"self_attn.{part}_proj.{t}"] = x
            sd[h + f"self_attn.out_proj.{t}"] = ours[p + f"proj.{t}"]
            sd[h + f"layer_norm1.{t}"] = ours[p + f"norm1.{t}"]
            sd[h + f"layer_norm2.{t}"] = ours[p + f"norm2.{t}"]
            sd[h + f"mlp.fc1.{t}"] = ours[p + f"fc1.{t}"]
            sd[h + f"mlp.fc2.{t}"] = ours[p + f"fc2.{t}"]
    model = SiglipVisionModel(cfg).to(dtype)
    sd = {(k if k in model.state_dict() else "vision_model." + k): v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or any("post_layernorm" not in m and "position_ids" not in m for m in missing):
        raise RuntimeError(f"baseline SigLIP: missing {missing[:3]} unexpected {unexpected[:3]}")
    return model.eval()


@dataclass
class BaselineRun:
    seconds: float
    first_token_s: float
    new_tokens: int


class Baseline:
    """Reference-style captioning of one image at a time."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        dtype = loaded.dtype
        self.llm = _hf_decoder(loaded.model.llm, loaded.family, dtype)
        self.vision = _hf_siglip(loaded.model.vision, dtype) if loaded.family == "bunny" else None

    def _features(self, pixels: PixelInputs) -> torch.Tensor:
        m = self.loaded.model
        if self.vision is not None:                                   # Bunny: HF SigLIP, batch 1
            x = pixels.crops[0][None].to(self.loaded.dtype)
            h = self.vision(x, output_hidden_states=True).hidden_states[-1]
            return m.projector(h)[0]
        # MiniCPM-V-2: the reference runs every slice alone through the tower and resampler
        return torch.cat([m.encode_images([PixelInputs(crops=(c,), grid=None)])[0] for c in pixels.crops])

    @torch.inference_mode()
    def caption(self, pixels: PixelInputs, question: str, max_new_tokens: int) -> BaselineRun:
        t0 = time.perf_counter()
        plan = self.loaded.prompts.build(question, pixels)
        emb = self.loaded.model.prompt_embeds(plan, self._features(pixels))[None]
        first = {}

        class _FirstToken:     # generate puts the prompt first, then each new token
            calls = 0

            def put(self, value):
                self.calls += 1
                if self.calls == 2:
                    first["t"] = time.perf_counter()

            def end(self):
                pass

        out = self.llm.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                                max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
                                use_cache=True, pad_token_id=0, streamer=_FirstToken())
        t1 = time.perf_counter()
        return BaselineRun(seconds=t1 - t0, first_token_s=first.get("t", t1) - t0, new_tokens=out.shape[-1])
