"""MiniCPM-V-2 pieces without the golden model run: slicing math, tokenizer, config, strict loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from models.loading import CheckpointError
from models.minicpmv2 import MiniCPMV2Config, frontend, image_placeholder, load
from models.minicpmv2_slicing import MiniCPMV2Processor, ensure_divide, find_best_resize, plan_slices
from models.minicpmv2_tokenizer import SlowLlamaTokenizer

CKPT = Path(__file__).parent / "golden" / "minicpmv2-tiny" / "checkpoint"

# docs/minicpmv2.md §5.3 worked examples:
# input (w, h) -> source (w, h), grid (cols, rows), refine (w, h), slice (w, h), images, query tokens
TABLE = [
    ((640, 480), (518, 392), (2, 1), (728, 546), (364, 546), 3, 192),
    ((480, 640), (392, 518), (1, 2), (546, 728), (546, 364), 3, 192),
    ((640, 427), (546, 364), (2, 1), (784, 518), (392, 518), 3, 192),
    ((500, 375), (518, 392), None, None, None, 1, 64),
    ((448, 448), (448, 448), None, None, None, 1, 64),
    ((300, 200), (546, 364), None, None, None, 1, 64),
    ((1024, 768), (518, 392), (2, 2), (1036, 784), (518, 392), 5, 320),
    ((1000, 1000), (448, 448), (2, 2), (896, 896), (448, 448), 5, 320),
    ((1920, 1080), (602, 336), (4, 2), (1680, 952), (420, 476), 9, 576),
    ((2000, 500), (896, 224), (4, 1), (1792, 448), (448, 448), 5, 320),
]


@pytest.mark.parametrize("size,source,grid,refine,slice_,n_images,n_query", TABLE, ids=[f"{t[0][0]}x{t[0][1]}" for t in TABLE])
def test_slice_plan_matches_spec_table(size, source, grid, refine, slice_, n_images, n_query):
    plan = plan_slices(size)
    assert (plan.source, plan.grid, plan.refine, plan.slice, plan.n_images) == (source, grid, refine, slice_, n_images)
    px = MiniCPMV2Processor()(Image.new("RGB", size, (10, 200, 30)))
    assert px.grid == grid
    slices = [(3, slice_[1], slice_[0])] * (n_images - 1) if grid else []
    assert [tuple(c.shape) for c in px.crops] == [(3, source[1], source[0]), *slices]
    assert 64 * len(px.crops) == n_query
    # a flat colour stays flat through bicubic resizes: checks the normalisation on every crop
    want = torch.tensor([10, 200, 30], dtype=torch.float32).div(255).sub(0.5).div(0.5)
    for c in px.crops:
        torch.testing.assert_close(c[:, 0, 0], want)
        torch.testing.assert_close(c.amax(dim=(1, 2)), c.amin(dim=(1, 2)))


def test_slicing_helpers_use_python_rounding_and_truncation():
    assert ensure_divide(21, 14) == 28          # round(1.5) = 2 (half to even)
    assert ensure_divide(35, 14) == 28          # round(2.5) = 2, not 3
    assert ensure_divide(3, 14) == 14           # at least one patch
    assert find_best_resize((300, 200), 448, 14) == (294, 196)            # small: no upscale, only rounding
    assert find_best_resize((300, 200), 448, 14, allow_upscale=True) == (546, 364)
    assert plan_slices((4000, 4000)).grid == (3, 3)                       # capped at 9 slices
    assert plan_slices((8000, 300)).grid == (9, 1)                        # ceil(11.96) capped at 9
    assert plan_slices((5000, 100)).grid == (4, 1)                        # ceil(2.49)=3: only 2..4 slices tried


def test_grayscale_and_rgba_inputs_become_three_channels():
    proc = MiniCPMV2Processor()
    for mode in ("L", "RGBA", "P"):
        px = proc(Image.new(mode, (320, 240)))
        assert all(c.shape[0] == 3 for c in px.crops)


def test_placeholder_layout():
    one = "<image>" + "<unk>" * 64 + "</image>"
    assert image_placeholder(None, 64) == one
    assert image_placeholder((3, 2), 64) == one + "<slice>" + one * 3 + "\n" + one * 3 + "</slice>"


# -- tokenizer -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok() -> SlowLlamaTokenizer:
    return SlowLlamaTokenizer(CKPT)


def test_tokenizer_encodes_each_chunk_with_its_own_dummy_prefix(tok):
    a, b = tok.sp.encode("a"), tok.sp.encode("b c")
    assert [tok.sp.id_to_piece(i) for i in a + b] == ["\u2581a", "\u2581b", "\u2581c"]   # "b" got its own "▁"
    assert tok.encode("a<image>b c") == [1, *a, 101, *b]
    # adjacent added tokens give no empty chunk; "<unk>" text is the added token 0
    assert tok.encode("<image><unk><unk></image>") == [1, 101, 0, 0, 102]
    # <用户>/<AI> are sentencepiece user-defined pieces, not added tokens: they come after the "▁"
    assert tok.encode("<用户>") == [1, 883, 113]
    assert tok.encode("") == [1]


def test_tokenizer_decode_legacy_semantics(tok):
    hello = tok.sp.encode("hello world")
    assert tok.decode(hello).text == "hello world"                     # first "▁" removed
    # legacy quirk: when a special token follows ordinary pieces, " " is appended to the output
    # BEFORE the decoded run (so it lands in front of the text, not before the token); none at i=0
    assert tok.decode([101, *hello]).text == "<image>hello world"
    assert tok.decode([*hello, 2]).text == " hello world</s>"
    assert tok.decode([*hello, 101, 102]).text == " hello world<image></image>"
    assert tok.decode([101, *hello, 102]).text == "<image> hello world</image>"
    # byte fallback: an invalid UTF-8 byte becomes U+FFFD, bytes of one character join up
    assert tok.decode([115 + 0xFD]).text == "\ufffd"
    assert tok.decode([115 + 0xC3, 115 + 0xA9]).text == "\u00e9"


def test_decode_never_crashes_on_ids_beyond_the_vocabulary(tok):
    from models.minicpmv2 import MiniCPMV2Prompts

    cfg = MiniCPMV2Config.from_dict(json.loads((CKPT / "config.json").read_text()))
    prompts = MiniCPMV2Prompts(tok, cfg)
    hello = tok.sp.encode("hello")
    assert tok.decode([*hello, 122752, 5000]).n_unknown == 2
    assert prompts.decode([1, *hello, 122752, 0, 2]) == "hello"
    assert prompts.unknown_ids_decoded == 1
    assert prompts.decode([]) == "" and prompts.decode([0, 0]) == ""


# -- config ----------------------------------------------------------------------------------------

def _real_config() -> dict:
    c = json.loads((CKPT / "config.json").read_text())
    del c["vision_config"]
    c.update(hidden_size=2304, num_hidden_layers=40, num_attention_heads=36, num_key_value_heads=36,
             intermediate_size=5760, vocab_size=122753)
    return c


def test_config_without_vision_config_uses_so400m_and_mup():
    cfg = MiniCPMV2Config.from_dict(_real_config())
    v = cfg.vit
    assert (v.width, v.depth, v.heads, v.mlp_dim, v.patch, v.grid) == (1152, 26, 16, 4304, 14, 27)
    assert (v.gelu_tanh, v.final_norm, v.eps) == (False, True, 1e-6)
    assert cfg.resampler_heads == 18 and cfg.query_num == 64
    assert cfg.llm.scale_emb == 12.0 and cfg.llm.logit_divisor == 9.0 and cfg.llm.rope_fp32
    assert cfg.llm.residual_scale == pytest.approx(0.22135943621178655, rel=1e-15)
    assert cfg.eos_token_id == 2 and cfg.max_length == 2048


def test_tiny_config():
    cfg = MiniCPMV2Config.from_dict(json.loads((CKPT / "config.json").read_text()))
    assert (cfg.vit.width, cfg.vit.depth, cfg.vit.heads, cfg.vit.mlp_dim) == (96, 2, 4, 358)
    assert cfg.resampler_heads == 2 and cfg.llm.logit_divisor == 1.25


@pytest.mark.parametrize("patch,msg", [({"slice_mode": False}, "slice_mode"), ({"hidden_act": "gelu"}, "hidden_act"),
                                       ({"rope_scaling": {"type": "linear"}}, "rope_scaling"),
                                       ({"vision_encoder": "vit_base_patch16_224"}, "vision_encoder")])
def test_unsupported_configs_are_refused(patch, msg):
    with pytest.raises(CheckpointError, match=msg):
        MiniCPMV2Config.from_dict({**_real_config(), **patch})
    with pytest.raises(CheckpointError, match="hidden_size"):
        MiniCPMV2Config.from_dict({k: v for k, v in _real_config().items() if k != "hidden_size"})


def test_frontend_needs_no_weights(tmp_path):
    for f in ("config.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(CKPT / f, tmp_path / f)
    proc, prompts = frontend(tmp_path)
    plan = prompts.build("Hi", proc(Image.new("RGB", (640, 480))))
    assert len(plan.image_spans) == 3 and prompts.eos_token_ids == (2,)


def test_template_can_be_swapped_by_a_preset():
    proc, prompts = frontend(CKPT)
    px = proc(Image.new("RGB", (100, 100)))
    assert prompts.text("Q?", px) == "<用户><image>" + "<unk>" * 64 + "</image>\nQ?<AI>"
    _, other = frontend(CKPT, template="<用户>{question}<image><AI>")
    assert other.text("<image>", px) == "<用户><image><image>" + "<unk>" * 64 + "</image><AI>"
    assert prompts.template != other.template


def test_prompt_too_long_is_cut_like_the_reference_or_refused():
    _, prompts = frontend(CKPT)
    px = MiniCPMV2Processor()(Image.new("RGB", (100, 100)))
    long_q = "word " * 3000
    plan = prompts.build(long_q, px)
    assert len(plan.ids) == 2048 and len(plan.image_spans) == 1       # text cut, image intact
    with pytest.raises(ValueError, match="image spans"):
        prompts.build("<image>", px)                                   # a stray <image> in the question


# -- strict loading --------------------------------------------------------------------------------

def _modified_checkpoint(tmp_path: Path, edit) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(CKPT, out)
    tensors = load_file(str(CKPT / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_missing_tensor_is_named(tmp_path):
    ckpt = _modified_checkpoint(tmp_path, lambda t: t.pop("resampler.ln_post.bias"))
    with pytest.raises(CheckpointError, match=r"resampler\.ln_post\.bias"):
        load(ckpt, torch.float32, torch.device("cpu"))


def test_extra_tensor_is_named(tmp_path):
    def add(t):
        t["vpm.blocks.2.norm1.weight"] = torch.ones(96, dtype=torch.bfloat16)   # the dropped block

    ckpt = _modified_checkpoint(tmp_path, add)
    with pytest.raises(CheckpointError, match=r"vpm\.blocks\.2\.norm1\.weight"):
        load(ckpt, torch.float32, torch.device("cpu"))


def test_wrong_shape_is_named(tmp_path):
    def bad(t):
        t["vpm.pos_embed"] = t["vpm.pos_embed"][0]                  # [729, 96] without timm's batch dim

    ckpt = _modified_checkpoint(tmp_path, bad)
    with pytest.raises(CheckpointError, match=r"vpm\.pos_embed"):
        load(ckpt, torch.float32, torch.device("cpu"))


def test_load_casts_to_the_requested_dtype():
    m = load(CKPT, torch.bfloat16, torch.device("cpu"))
    dtypes = {p.dtype for p in m.model.parameters()}
    assert dtypes == {torch.bfloat16}
    assert m.family == "minicpmv2" and m.max_context == 4096


def test_registry_knows_the_family():
    from models.registry import family_of, load_frontend

    assert family_of(CKPT) == "minicpmv"
    proc, prompts = load_frontend(CKPT)
    assert isinstance(proc, MiniCPMV2Processor) and prompts.eos_token_ids == (2,)
