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
from models.config_schema import MAX_HEADS, MAX_HIDDEN, MAX_IMAGE_SIDE, MAX_INTERMEDIATE, MAX_LAYERS, \
    MAX_POSITIONS, Fields, heads_divide, read_decoder
from models.checkpoint_check import check_weights, decoder_parameters, vit_parameters
from models.loading import CheckpointError, HeaderSource, NameMap, TensorSource, linear_weight_names, load_into, \
    read_config, read_json_object
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


def vision_config(v: Fields) -> tuple[ViTConfig, int]:
    """(tower, input side) from an HF SigLIP vision_config; missing keys take the so400m values.
    Bunny keeps all layers but the last (its feature is the penultimate layer's output)."""
    width = v.integer("hidden_size", 1, MAX_HIDDEN, SO400M["hidden_size"])
    heads = v.integer("num_attention_heads", 1, MAX_HEADS, SO400M["num_attention_heads"])
    heads_divide(v, "hidden_size", width, "num_attention_heads", heads)
    image = v.integer("image_size", 1, MAX_IMAGE_SIDE, SO400M["image_size"])
    patch = v.integer("patch_size", 1, image, SO400M["patch_size"])
    act = v.string("hidden_act", SO400M["hidden_act"], choices=("gelu_pytorch_tanh", "gelu"))
    vit = ViTConfig(width=width, depth=v.integer("num_hidden_layers", 2, MAX_LAYERS, SO400M["num_hidden_layers"]) - 1,
                    heads=heads, mlp_dim=v.integer("intermediate_size", 1, MAX_INTERMEDIATE, SO400M["intermediate_size"]),
                    patch=patch, grid=image // patch,
                    eps=v.number("layer_norm_eps", 0.0, 1.0, SO400M["layer_norm_eps"], open_low=True),
                    gelu_tanh=act == "gelu_pytorch_tanh", final_norm=False,
                    channels=v.integer("num_channels", 3, 3, 3))      # the processor makes RGB
    return vit, image


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
        """Every value checked for type and range (models/config_schema.py): config.json is untrusted."""
        f = Fields(c)
        f.string("mm_projector_type", "mlp2x_gelu", choices=("mlp2x_gelu",))
        f.string("image_aspect_ratio", "pad", choices=("pad",))
        vit, image_size = vision_config(f.nested("vision_config") or Fields({}, "vision_config."))
        n_image = vit.grid * vit.grid
        max_length = f.integer("tokenizer_model_max_length", n_image + 1, MAX_POSITIONS, 2048)
        # positions must cover every prompt the tokenizer length allows
        llm = read_decoder(f, rms_eps=1e-6, rope_theta=1e6, max_position=32768, min_position=max_length,
                           qkv_bias=True)
        mm_hidden = f.integer("mm_hidden_size", 1, MAX_HIDDEN, vit.width)
        f.require(mm_hidden == vit.width, f"mm_hidden_size {mm_hidden} must equal vision_config.hidden_size "
                                          f"{vit.width} (the projector takes the vision features)")
        return BunnyConfig(llm=llm, vit=vit, image_size=image_size,
                           mm_hidden=mm_hidden, eos_token_id=f.token_id("eos_token_id", llm.vocab_size, 151643),
                           max_length=max_length, name=f.string("_name_or_path", "bunny"))

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

    def longest_prompt(self, question: str) -> PromptPlan:
        """The plan for the largest image the processor makes (every Bunny image is one crop);
        ValueError when the question does not fit this template and tokenizer length."""
        return self.build(question)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True).strip()


# What tokenizer_config.json may name: the class itself, its fast twin, or the checkpoint's own
# copy of it (remote code we never run, replaced by the built-in class).
TOKENIZER_CLASSES = ("Qwen2Tokenizer", "Qwen2TokenizerFast")


def load_tokenizer(model_dir: str | Path):
    """The checkpoint's own vocab/merges through transformers' built-in Qwen2Tokenizer.

    The class is fixed here, not taken from tokenizer_config.json as AutoTokenizer would: that
    file is untrusted and could name any tokenizer class transformers ships. A file naming
    another class is refused, since its ids would then not be what the model was trained on."""
    import transformers
    from transformers import Qwen2Tokenizer

    cfg_path = Path(model_dir) / "tokenizer_config.json"
    named = read_json_object(cfg_path).get("tokenizer_class") if cfg_path.is_file() else None
    if named is not None and named not in TOKENIZER_CLASSES:
        raise CheckpointError(f"{cfg_path}: tokenizer_class {str(named)[:60]!r} is not supported for Bunny "
                              f"(only {' / '.join(TOKENIZER_CLASSES)})")
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # silence "model of type bunny-qwen2" chatter
    try:
        return Qwen2Tokenizer.from_pretrained(str(model_dir), trust_remote_code=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read the tokenizer files is one clear error
        raise CheckpointError(f"{model_dir}: cannot load the tokenizer ({type(e).__name__}: {str(e)[:200]})") from None
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


def checkpoint_name_map(cfg: BunnyConfig, names: set[str]) -> NameMap:
    """name_map plus the tensors of a checkpoint that are skipped by design: the dropped last
    SigLIP layer and the pooling head, when the file still carries them."""
    nm = name_map(cfg)
    nm.ignore(n for n in names if n.startswith(VT + f"encoder.layers.{cfg.vit.depth}.") or n.startswith(VT + "head."))
    return nm


def parameter_count(cfg: BunnyConfig) -> int:
    """Values in a Bunny checkpoint for this config (without the tensors it may carry unused)."""
    h = cfg.llm.hidden_size
    projector = cfg.mm_hidden * h + h + h * h + h
    return decoder_parameters(cfg.llm) + vit_parameters(cfg.vit) + projector


def check(raw: dict, src: HeaderSource) -> tuple[BunnyConfig, int]:
    """config.json against the schema, then the weights' headers against the architecture (see
    models/checkpoint_check.py); returns the config and its parameter count. Reads no weight."""
    cfg = BunnyConfig.from_dict(raw)
    n = parameter_count(cfg)
    check_weights(n, cfg.llm, cfg.vit, src, lambda: Bunny(cfg), checkpoint_name_map(cfg, src.names()))
    return cfg, n


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
