"""MiniCPM-V-2: timm SigLIP-so400m (26 of 27 blocks, final LN) -> perceiver resampler (64 queries
per crop) -> MiniCPM-2.4B (llama-family decoder with muP scales).

Spec: ../shared/docs/minicpmv2.md. Loads the original openbmb/MiniCPM-V-2 checkpoint folder
(config.json, model.safetensors with the original `vpm.*`, `resampler.*`, `llm.*` names,
tokenizer.model + JSON); no remote code, no pickle. Slicing lives in minicpmv2_slicing.py, the
resampler in resampler.py, the slow SentencePiece tokenizer in minicpmv2_tokenizer.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from models.base import LoadedModel, PixelInputs, PromptPlan, splice
from models.decoder import Decoder, DecoderConfig, map_llama_names, residual_scale
from models.checkpoint_check import check_weights, decoder_parameters, vit_parameters
from models.config_schema import MAX_HEADS, MAX_HIDDEN, MAX_IMAGE_SIDE, MAX_LAYERS, Fields, heads_divide, read_decoder
from models.loading import CheckpointError, HeaderSource, NameMap, TensorSource, linear_weight_names, load_into, \
    read_config
from models.minicpmv2_slicing import MiniCPMV2Processor, SliceConfig
from models.minicpmv2_tokenizer import SlowLlamaTokenizer
from models.resampler import Resampler
from models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# timm vit_so400m_patch14_siglip_384 dims, used when config.json has no "vision_config" (the real
# checkpoint). depth counts the block that drop_vision_last_layer removes.
SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362, patch_size=14, img_size=384)
SO400M_NAMES = ("vit_so400m_patch14_siglip_384", "vit_so400m_patch14_siglip_384.webli")

IM_START, IM_END, UNK = "<image>", "</image>", "<unk>"
SLICE_START, SLICE_END = "<slice>", "</slice>"
# MiniCPMV.chat for one user turn with an image (§5.5): the one "<image>" stands for the whole
# placeholder (source + slices), then "\n" and the question; no system prompt, no separators.
TEMPLATE = "<用户><image>\n{question}<AI>"
MAX_PROMPT = 2048               # chat()'s max_inp_length: prompt ids are cut here


@dataclass(frozen=True)
class MiniCPMV2Config:
    llm: DecoderConfig
    vit: ViTConfig
    slicing: SliceConfig
    query_num: int                  # resampler queries per crop (64 = 8x8)
    resampler_heads: int            # hidden // 128, floor (2304 -> 18; the tiny 320 -> 2)
    eos_token_id: int
    max_length: int                 # chat()'s max_inp_length: prompt ids are cut here
    name: str

    @staticmethod
    def from_dict(c: dict) -> "MiniCPMV2Config":
        """Every value checked for type and range (models/config_schema.py): config.json is untrusted."""
        f = Fields(c)
        f.require(f.boolean("slice_mode", True), "slice_mode false is not supported (every released MiniCPM-V-2 slices)")
        f.require(c.get("rope_scaling") is None, f"rope_scaling {str(c.get('rope_scaling'))[:60]} is not supported")
        f.string("hidden_act", "silu", choices=("silu",))
        v = f.nested("vision_config")
        if v is None:
            f.string("vision_encoder", SO400M_NAMES[1], choices=SO400M_NAMES)
            v = Fields({}, "vision_config.")
        vit = vision_config(v, drop_last=f.boolean("drop_vision_last_layer", True))
        query_num = f.integer("query_num", 1, 1024, 64)
        f.require(math.isqrt(query_num) ** 2 == query_num, f"query_num {query_num} is not a square grid")
        slicing = SliceConfig(max_slices=f.integer("max_slice_nums", 1, 64, 9),
                              # a side of 4 x 448 already means 16x the vision tokens of the released model
                              scale_resolution=f.integer("scale_resolution", vit.patch, 4 * 448, 448), patch=vit.patch)
        # the source image and every slice are one <image>...</image> block of query_num slots each
        longest = (1 + slicing.max_slices) * (query_num + 2) + 2
        f.require(longest < MAX_PROMPT, f"max_slice_nums {slicing.max_slices} x query_num {query_num}: an image "
                                        f"placeholder of {longest} tokens does not fit the {MAX_PROMPT}-token prompt")
        llm = read_decoder(f, rms_eps=1e-5, rope_theta=10000.0, max_position=4096, min_position=MAX_PROMPT,
                           qkv_bias=f.boolean("attention_bias", False), rope_fp32=True)
        hidden, n_layers = llm.hidden_size, llm.n_layers
        # resampler: hidden // 128 heads (the reference's floor), and a 2D sin-cos table needs hidden % 4 == 0
        heads = hidden // 128
        f.require(heads >= 1 and hidden % heads == 0 and hidden % 4 == 0,
                  f"hidden_size {hidden}: the resampler needs a multiple of 4 that hidden_size // 128 heads divide")
        llm = replace(llm, scale_emb=f.number("scale_emb", 0.0, 1e4, 1, open_low=True),
                      residual_scale=residual_scale(f.number("scale_depth", 0.0, 1e3, 1.0, open_low=True), n_layers),
                      logit_divisor=hidden / f.number("dim_model_base", 0.0, MAX_HIDDEN, hidden, open_low=True))
        return MiniCPMV2Config(
            llm=llm, vit=vit, query_num=query_num, resampler_heads=heads, slicing=slicing,
            eos_token_id=f.token_id("eos_token_id", llm.vocab_size, 2), max_length=MAX_PROMPT,
            name=f.string("_name_or_path", "minicpmv2"))


def vision_config(v: Fields, drop_last: bool) -> ViTConfig:
    """timm SigLIP dims (so400m's where a key is missing); drop_last removes the last block as the
    reference's drop_vision_last_layer does."""
    width = v.integer("embed_dim", 1, MAX_HIDDEN, SO400M["embed_dim"])
    heads = v.integer("num_heads", 1, MAX_HEADS, SO400M["num_heads"])
    heads_divide(v, "embed_dim", width, "num_heads", heads)
    image = v.integer("img_size", 1, MAX_IMAGE_SIDE, SO400M["img_size"])
    patch = v.integer("patch_size", 1, image, SO400M["patch_size"])
    depth = v.integer("depth", 2 if drop_last else 1, MAX_LAYERS, SO400M["depth"]) - (1 if drop_last else 0)
    mlp_ratio = v.number("mlp_ratio", 0.0, 64.0, SO400M["mlp_ratio"], open_low=True)
    mlp_dim = int(width * mlp_ratio)                                   # timm: int(dim * mlp_ratio)
    v.require(mlp_dim >= 1, f"vision_config.embed_dim {width} x mlp_ratio {mlp_ratio:g} leaves no MLP")
    return ViTConfig(width=width, depth=depth, heads=heads, mlp_dim=mlp_dim, patch=patch, grid=image // patch,
                     eps=1e-6, gelu_tanh=False, final_norm=True)               # timm: exact erf GELU


# -- prompt ----------------------------------------------------------------------------------------

def image_placeholder(grid: tuple[int, int] | None, query_num: int) -> str:
    """<image><unk>*Q</image> for the source, then the slices: one line of `cols` blocks per row."""
    one = IM_START + UNK * query_num + IM_END
    if grid is None:
        return one
    cols, rows = grid
    return one + SLICE_START + "\n".join(one * cols for _ in range(rows)) + SLICE_END


class MiniCPMV2Prompts:
    """`<用户>{placeholder}\\n{question}<AI>` -> ids (BOS first) and the 64-slot image spans."""

    def __init__(self, tokenizer: SlowLlamaTokenizer, cfg: MiniCPMV2Config, template: str = TEMPLATE):
        self.tok = tokenizer
        self.template = template        # a preset may swap it (one "<image>", one "{question}")
        self.query_num = cfg.query_num
        self.max_slices = cfg.slicing.max_slices
        self.max_length = cfg.max_length
        self.eos_token_ids = (cfg.eos_token_id,)
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.unknown_ids_decoded = 0        # ids beyond the tokenizer (random full-size heads)

    def text(self, question: str, pixels: PixelInputs) -> str:
        parts = self.template.split(IM_START)
        if len(parts) != 2:
            raise ValueError(f"the MiniCPM-V-2 template must contain exactly one {IM_START}")
        # the placeholder goes in first, so a question that mentions "<image>" cannot move it
        before, after = (p.replace("{question}", question) for p in parts)
        return before + image_placeholder(pixels.grid, self.query_num) + after

    def build(self, question: str, pixels: PixelInputs) -> PromptPlan:
        ids = self.tok.encode(self.text(question, pixels))
        if len(ids) > self.max_length:
            # The reference cuts at max_inp_length (text only survives if images come first).
            log.warning("prompt of %d tokens cut to %d", len(ids), self.max_length)
            ids = ids[:self.max_length]
        starts = [i + 1 for i, t in enumerate(ids) if t == self.im_start_id]
        ends = [i for i, t in enumerate(ids) if t == self.im_end_id]
        spans = tuple(zip(starts, ends))
        n_crops = len(pixels.crops)
        if len(starts) != len(ends) or len(spans) != n_crops or any(e - s != self.query_num for s, e in spans):
            raise ValueError(f"prompt has image spans {spans}, expected {n_crops} blocks of {self.query_num} "
                             f"(question containing {IM_START}/{IM_END}, or cut at {self.max_length} tokens?)")
        return PromptPlan(ids=tuple(ids), image_spans=spans)

    def longest_prompt(self, question: str) -> PromptPlan:
        """The plan for the most slices the processor can make, stacked in one column (the most
        row breaks too); ValueError when the question cannot fit around them."""
        n = self.max_slices if self.max_slices > 1 else 0       # one allowed slice: never sliced
        crops = (torch.zeros(3, 1, 1),) * (1 + n)                # only the count matters here
        return self.build(question, PixelInputs(crops=crops, grid=(1, n) if n else None))

    def decode(self, ids: list[int]) -> str:
        """The reference's _decode_text: drop every 0, a leading BOS and a trailing EOS; decode; strip."""
        ids = [int(i) for i in ids if int(i) != 0]
        if ids and ids[0] == self.tok.bos_id:
            ids = ids[1:]
        if ids and ids[-1] == self.tok.eos_id:
            ids = ids[:-1]
        res = self.tok.decode(ids)
        if res.n_unknown:
            if not self.unknown_ids_decoded:
                log.warning("generated ids beyond the tokenizer's %d entries are decoded as '' "
                            "(random weights, or a tokenizer that does not match the checkpoint?)",
                            self.tok.vocab_size)
            self.unknown_ids_decoded += res.n_unknown
        return res.text.strip()


# -- the model -------------------------------------------------------------------------------------

class MiniCPMV2(nn.Module):
    def __init__(self, cfg: MiniCPMV2Config, max_crops_per_call: int = 16):
        super().__init__()
        self.cfg = cfg
        self.max_crops_per_call = max_crops_per_call   # bounds the ViT's activation memory
        self.vision = ViT(cfg.vit)
        self.resampler = Resampler(cfg.query_num, cfg.llm.hidden_size, cfg.resampler_heads, kv_dim=cfg.vit.width)
        self.llm = Decoder(cfg.llm)

    def encode_crops(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] crops of one size -> [B, query_num, hidden] resampled features."""
        p = self.cfg.vit.patch
        h, w = pixels.shape[-2:]
        if h % p or w % p:
            raise ValueError(f"crop {h}x{w} is not a multiple of the {p}-pixel patch")
        x = self.vision(pixels)                                      # [B, (h/p)*(w/p), vit width]
        return self.resampler(x, (h // p, w // p))                   # [B, Q, hidden]

    @torch.inference_mode()
    def encode_images(self, batch: list[PixelInputs]) -> list[torch.Tensor]:
        """Per image [query_num * n_crops, hidden], crops in order (source, then slices row-major).

        Crops of equal size (from any image of the batch) share one ViT + resampler call; the
        reference runs them one by one, which gives the same values up to kernel rounding.
        """
        dev, dtype = self.llm.embed_tokens.weight.device, self.llm.embed_tokens.weight.dtype
        by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}
        for i, px in enumerate(batch):
            for j, crop in enumerate(px.crops):
                by_shape.setdefault(tuple(crop.shape[-2:]), []).append((i, j))
        out: list[list[torch.Tensor | None]] = [[None] * len(px.crops) for px in batch]
        for where in by_shape.values():
            for k in range(0, len(where), self.max_crops_per_call):
                chunk = where[k:k + self.max_crops_per_call]
                x = torch.stack([batch[i].crops[j] for i, j in chunk]).to(dev)
                feats = self.encode_crops(x).to(dtype)                   # [n, Q, hidden]
                for (i, j), f in zip(chunk, feats.unbind(0)):
                    out[i][j] = f
        return [torch.cat(fs, dim=0) if fs else torch.empty(0, self.cfg.llm.hidden_size, device=dev, dtype=dtype)
                for fs in out]

    def prompt_embeds(self, plan: PromptPlan, features: torch.Tensor) -> torch.Tensor:
        """Text ids x scale_emb, with the (unscaled) image features written into the <unk> slots."""
        return splice(self.llm, plan, features)


def _drop_batch_dim(t: torch.Tensor) -> torch.Tensor:
    """timm stores the position embedding with a batch dim: [1, 729, C] -> ours [729, C]."""
    if t.dim() != 3 or t.shape[0] != 1:
        raise CheckpointError(f"tensor vpm.pos_embed has shape {tuple(t.shape)}, expected [1, grid*grid, width]")
    return t[0]


def name_map(cfg: MiniCPMV2Config) -> NameMap:
    m = NameMap()
    map_llama_names(m, cfg.llm, src="llm.model.", lm_head="llm.lm_head.weight")

    # timm VisionTransformer names; qkv is already fused there, like ours.
    m.add("vision.patch_embed.weight", "vpm.patch_embed.proj.weight")
    m.add("vision.patch_embed.bias", "vpm.patch_embed.proj.bias")
    m.add("vision.pos_embed", "vpm.pos_embed", transform=_drop_batch_dim)
    for j in range(cfg.vit.depth):
        p, q = f"vpm.blocks.{j}.", f"vision.blocks.{j}."
        for t in ("weight", "bias"):
            m.add(q + f"qkv.{t}", p + f"attn.qkv.{t}")
            m.add(q + f"proj.{t}", p + f"attn.proj.{t}")
            m.add(q + f"norm1.{t}", p + f"norm1.{t}")
            m.add(q + f"norm2.{t}", p + f"norm2.{t}")
            m.add(q + f"fc1.{t}", p + f"mlp.fc1.{t}")
            m.add(q + f"fc2.{t}", p + f"mlp.fc2.{t}")
    for t in ("weight", "bias"):
        m.add(f"vision.norm.{t}", f"vpm.norm.{t}")

    for n in ("query", "pos_embed", "proj", "attn.in_proj_weight", "attn.in_proj_bias",
              "attn.out_proj.weight", "attn.out_proj.bias"):
        m.add(f"resampler.{n}", f"resampler.{n}")
    if cfg.vit.width != cfg.llm.hidden_size:
        m.add("resampler.kv_proj.weight", "resampler.kv_proj.weight")
    for ln in ("ln_q", "ln_kv", "ln_post"):
        for t in ("weight", "bias"):
            m.add(f"resampler.{ln}.{t}", f"resampler.{ln}.{t}")
    return m


def checkpoint_shapes(cfg: MiniCPMV2Config) -> dict[str, tuple[int, ...]]:
    """Original tensor name -> shape in the hub's file (for writing random full-size checkpoints)."""
    with torch.device("meta"):
        params = dict(MiniCPMV2(cfg).named_parameters())
    shapes: dict[str, tuple[int, ...]] = {}
    for rule in name_map(cfg).rules:
        full = tuple(params[rule.target].shape)
        k = len(rule.sources)               # fused q|k|v and gate|up split evenly on dim 0
        for s in rule.sources:
            shapes[s] = (full[0] // k, *full[1:])
    shapes["vpm.pos_embed"] = (1, *shapes["vpm.pos_embed"])
    return shapes


def parameter_count(cfg: MiniCPMV2Config) -> int:
    """Values in a MiniCPM-V-2 checkpoint for this config."""
    d, q, kv = cfg.llm.hidden_size, cfg.query_num, cfg.vit.width
    resampler = (2 * q * d + (kv * d if kv != d else 0) + (3 * d * d + 3 * d) + (d * d + d)
                 + 3 * 2 * d + d * d)            # query, pos_embed, kv_proj, attn in/out, 3 LayerNorms, proj
    return decoder_parameters(cfg.llm) + vit_parameters(cfg.vit) + resampler


def check(raw: dict, src: HeaderSource) -> tuple[MiniCPMV2Config, int]:
    """config.json against the schema, then the weights' headers against the architecture (see
    models/checkpoint_check.py); returns the config and its parameter count. Reads no weight."""
    cfg = MiniCPMV2Config.from_dict(raw)
    n = parameter_count(cfg)
    check_weights(n, cfg.llm, cfg.vit, src, lambda: MiniCPMV2(cfg), name_map(cfg))
    return cfg, n


def load_tokenizer(model_dir: str | Path) -> SlowLlamaTokenizer:
    return SlowLlamaTokenizer(model_dir)


def frontend(model_dir: str | Path, template: str | None = None) -> tuple[MiniCPMV2Processor, MiniCPMV2Prompts]:
    """The CPU-side parts (image processor, prompt builder) without loading any weights.

    template: a preset's prompt template (one "<image>", one "{question}"); None = the family's."""
    cfg = MiniCPMV2Config.from_dict(read_config(model_dir))
    return MiniCPMV2Processor(cfg.slicing), MiniCPMV2Prompts(load_tokenizer(model_dir), cfg, template or TEMPLATE)


def load(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
         keep_stored_linears: bool = False) -> LoadedModel:
    """keep_stored_linears: fp32 compute with Linear weights kept in the checkpoint's 16-bit dtype
    (they must then be replaced by WideningLinear layers; models/registry.load_model does)."""
    cfg = MiniCPMV2Config.from_dict(read_config(model_dir))
    src = TensorSource(model_dir)
    with torch.device("meta"):
        model = MiniCPMV2(cfg)
    load_into(model, src, name_map(cfg), dtype=dtype, device=device,
              keep_stored=linear_weight_names(model) if keep_stored_linears else None)
    model.eval()
    tok = load_tokenizer(model_dir)
    if tok.vocab_size != cfg.llm.vocab_size:
        log.warning("tokenizer has %d entries but the LM head %d rows", tok.vocab_size, cfg.llm.vocab_size)
    return LoadedModel(family="minicpmv2", name=cfg.name, model=model, processor=MiniCPMV2Processor(cfg.slicing),
                       prompts=MiniCPMV2Prompts(tok, cfg), dtype=dtype, device=torch.device(device),
                       max_context=cfg.llm.max_position)
