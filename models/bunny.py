"""Bunny-v1_0-2B-zh: SigLIP (26 of 27 layers, pre-post-LN feature) -> mlp2x_gelu -> Qwen2.

Spec: ../shared/docs/bunny.md. Loads the original BAAI checkpoint folder (config.json,
model.safetensors with the original tensor names, Qwen2 tokenizer files); no remote code.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.base import LoadedModel, PixelInputs, PromptPlan, splice
from models.decoder import Decoder, DecoderConfig, map_llama_names
from models.loading import CheckpointError, NameMap, TensorSource, linear_weight_names, load_into, read_config
from models.vit import ViT, ViTConfig

log = logging.getLogger(__name__)

# The model card / conv_bunny template. The question replaces {question}.
TEMPLATE = ("A chat between a curious user and an artificial intelligence assistant. "
            "The assistant gives helpful, detailed, and polite answers to the user's questions. "
            "USER: <image>\n{question} ASSISTANT:")
IMAGE_TOKEN = "<image>"

# so400m-patch14-384, used when config.json has no "vision_config" (the real checkpoint).
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
              image_size=384, patch_size=14, num_channels=3, layer_norm_eps=1e-6,
              hidden_act="gelu_pytorch_tanh")

VT = "model.vision_tower.vision_tower.vision_model."


@dataclass(frozen=True)
class BunnyConfig:
    llm: DecoderConfig
    vit: ViTConfig
    image_size: int
    mm_hidden: int
    eos_token_id: int
    max_length: int                 # tokenizer_model_max_length: spliced sequences are cut here
    name: str

    @staticmethod
    def from_dict(c: dict) -> "BunnyConfig":
        try:
            if c.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
                raise CheckpointError(f"unsupported mm_projector_type {c['mm_projector_type']!r} (only mlp2x_gelu)")
            if c.get("image_aspect_ratio", "pad") != "pad":
                raise CheckpointError(f"unsupported image_aspect_ratio {c['image_aspect_ratio']!r} (only pad)")
            v = {**SO400M, **c.get("vision_config", {})}
            if v["hidden_act"] not in ("gelu_pytorch_tanh", "gelu"):
                raise CheckpointError(f"unsupported vision hidden_act {v['hidden_act']!r}")
            grid = v["image_size"] // v["patch_size"]
            llm = DecoderConfig(
                vocab_size=int(c["vocab_size"]), hidden_size=int(c["hidden_size"]),
                n_layers=int(c["num_hidden_layers"]), n_heads=int(c["num_attention_heads"]),
                n_kv_heads=int(c.get("num_key_value_heads", c["num_attention_heads"])),
                intermediate_size=int(c["intermediate_size"]), rms_eps=float(c.get("rms_norm_eps", 1e-6)),
                rope_theta=float(c.get("rope_theta", 1e6)),
                max_position=int(c.get("max_position_embeddings", 32768)), qkv_bias=True)
            vit = ViTConfig(width=int(v["hidden_size"]), depth=int(v["num_hidden_layers"]) - 1,
                            heads=int(v["num_attention_heads"]), mlp_dim=int(v["intermediate_size"]),
                            patch=int(v["patch_size"]), grid=grid, eps=float(v["layer_norm_eps"]),
                            gelu_tanh=v["hidden_act"] == "gelu_pytorch_tanh", final_norm=False,
                            channels=int(v["num_channels"]))
            eos = c.get("eos_token_id", 151643)
            return BunnyConfig(llm=llm, vit=vit, image_size=int(v["image_size"]),
                               mm_hidden=int(c.get("mm_hidden_size", vit.width)),
                               eos_token_id=int(eos[0] if isinstance(eos, list) else eos),
                               max_length=int(c.get("tokenizer_model_max_length", 2048)),
                               name=str(c.get("_name_or_path", "bunny")))
        except KeyError as e:
            raise CheckpointError(f"config.json lacks {e.args[0]!r} needed for Bunny") from e

    @property
    def n_image_tokens(self) -> int:
        return self.vit.grid * self.vit.grid


# -- preprocessing ---------------------------------------------------------------------------------

class BunnyProcessor:
    """Pad to square with (127,127,127) centred, PIL bicubic to 384x384, (u8/255 - 0.5)/0.5."""

    PAD = (127, 127, 127)  # tuple(int(m * 255) for m in (0.5, 0.5, 0.5))

    def __init__(self, image_size: int = 384):
        self.size = image_size

    def square_u8(self, image: Image.Image) -> np.ndarray:
        """[3, S, S] uint8 after padding and resizing (exactly the reference's PIL path)."""
        img = image if image.mode == "RGB" else image.convert("RGB")
        w, h = img.size
        if w != h:
            side = max(w, h)
            canvas = Image.new("RGB", (side, side), self.PAD)
            canvas.paste(img, ((side - w) // 2, (side - h) // 2))
            img = canvas
        img = img.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1).copy()

    def __call__(self, image: Image.Image) -> PixelInputs:
        u8 = self.square_u8(image)
        # float32(u8 * (1/255)) computed in float64 then rounded, as transformers' rescale does
        x = (u8.astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.float32(0.5)) / np.float32(0.5)
        return PixelInputs(crops=(torch.from_numpy(x),))


# -- prompt ----------------------------------------------------------------------------------------

class BunnyPrompts:
    """Template -> ids with one image span of n_image_tokens placeholder slots.

    Each `<image>`-separated chunk is tokenized alone (no BOS for Qwen): chunk0 ends with a lone
    space token and chunk1 starts with '\\n', which tokenizing the whole string would not give.
    """

    def __init__(self, tokenizer, cfg: BunnyConfig, template: str = TEMPLATE):
        self.tok = tokenizer
        self.template = template
        self.n_image = cfg.n_image_tokens
        self.max_length = cfg.max_length
        self.eos_token_ids = (cfg.eos_token_id,)

    def chunk_ids(self, question: str) -> list[list[int]]:
        text = self.template.replace("{question}", question)
        chunks = text.split(IMAGE_TOKEN)
        if len(chunks) != 2:
            raise ValueError("the Bunny template must contain exactly one <image>")
        return [list(self.tok(c, add_special_tokens=True).input_ids) for c in chunks]

    def build(self, question: str, pixels: PixelInputs | None = None) -> PromptPlan:
        c0, c1 = self.chunk_ids(question)
        ids = c0 + [0] * self.n_image + c1
        if len(ids) > self.max_length:
            raise ValueError(f"prompt is {len(ids)} tokens, over tokenizer_model_max_length {self.max_length}")
        return PromptPlan(ids=tuple(ids), image_spans=((len(c0), len(c0) + self.n_image),))

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own tokenizer through transformers' built-in classes (never remote code)."""
    import transformers
    from transformers import AutoTokenizer

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "model of type bunny-qwen2" chatter
    try:
        return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    finally:
        transformers.logging.set_verbosity(verbosity)


# -- the model -------------------------------------------------------------------------------------

class Bunny(nn.Module):
    def __init__(self, cfg: BunnyConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = ViT(cfg.vit)
        self.projector = nn.Sequential(nn.Linear(cfg.mm_hidden, cfg.llm.hidden_size), nn.GELU(),
                                       nn.Linear(cfg.llm.hidden_size, cfg.llm.hidden_size))
        self.llm = Decoder(cfg.llm)

    def vision_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] -> [B, 729, vision width], the output of the last kept SigLIP layer."""
        return self.vision(pixels)

    @torch.inference_mode()
    def encode_images(self, batch: list[PixelInputs]) -> list[torch.Tensor]:
        """Every Bunny image is one 384x384 crop, so the whole batch runs in one ViT call."""
        if not batch:
            return []
        dev = self.llm.embed_tokens.weight.device
        x = torch.stack([p.crops[0] for p in batch]).to(dev)
        feats = self.projector(self.vision_features(x))                             # [B, 729, hidden]
        return list(feats.unbind(0))

    def prompt_embeds(self, plan: PromptPlan, features: torch.Tensor) -> torch.Tensor:
        return splice(self.llm, plan, features)


def name_map(cfg: BunnyConfig) -> NameMap:
    m = NameMap()
    map_llama_names(m, cfg.llm, src="model.", lm_head="lm_head.weight")
    for j in (0, 2):
        for t in ("weight", "bias"):
            m.add(f"projector.{j}.{t}", f"model.mm_projector.{j}.{t}")
    m.add("vision.patch_embed.weight", VT + "embeddings.patch_embedding.weight")
    m.add("vision.patch_embed.bias", VT + "embeddings.patch_embedding.bias")
    m.add("vision.pos_embed", VT + "embeddings.position_embedding.weight")
    for j in range(cfg.vit.depth):
        p, q = VT + f"encoder.layers.{j}.", f"vision.blocks.{j}."
        for t in ("weight", "bias"):
            m.add(q + f"qkv.{t}", *(p + f"self_attn.{x}_proj.{t}" for x in "qkv"))
            m.add(q + f"proj.{t}", p + f"self_attn.out_proj.{t}")
            m.add(q + f"norm1.{t}", p + f"layer_norm1.{t}")
            m.add(q + f"norm2.{t}", p + f"layer_norm2.{t}")
            m.add(q + f"fc1.{t}", p + f"mlp.fc1.{t}")
            m.add(q + f"fc2.{t}", p + f"mlp.fc2.{t}")
    # post_layernorm is in the file but Bunny takes the feature before it; a checkpoint that still
    # carries the dropped last layer or the pooling head is accepted and those tensors are skipped.
    m.ignore([VT + "post_layernorm.weight", VT + "post_layernorm.bias"])
    return m


def frontend(model_dir: str | Path, template: str | None = None) -> tuple[BunnyProcessor, BunnyPrompts]:
    """The CPU-side parts (image processor, prompt builder) without loading any weights.

    template: a preset's prompt template (one "<image>", one "{question}"); None = the model card's."""
    cfg = BunnyConfig.from_dict(read_config(model_dir))
    return BunnyProcessor(cfg.image_size), BunnyPrompts(load_tokenizer(model_dir), cfg, template or TEMPLATE)


def load(model_dir: str | Path, dtype: torch.dtype, device: torch.device,
         keep_stored_linears: bool = False) -> LoadedModel:
    """keep_stored_linears: fp32 compute with Linear weights kept in the checkpoint's 16-bit dtype
    (they must then be replaced by WideningLinear layers; models/registry.load_model does)."""
    raw = read_config(model_dir)
    cfg = BunnyConfig.from_dict(raw)
    src = TensorSource(model_dir)
    nm = name_map(cfg)
    dropped = [n for n in src.names()
               if n.startswith(VT + f"encoder.layers.{cfg.vit.depth}.") or n.startswith(VT + "head.")]
    nm.ignore(dropped)
    with torch.device("meta"):
        model = Bunny(cfg)
    load_into(model, src, nm, dtype=dtype, device=device,
              keep_stored=linear_weight_names(model) if keep_stored_linears else None)
    model.eval()
    tok = load_tokenizer(model_dir)
    return LoadedModel(family="bunny", name=cfg.name, model=model, processor=BunnyProcessor(cfg.image_size),
                       prompts=BunnyPrompts(tok, cfg), dtype=dtype, device=torch.device(device),
                       max_context=cfg.llm.max_position)
