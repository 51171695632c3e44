"""Strict checkpoint loading: every tensor used, none missing, clear errors naming the offender."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import BUNNY
from models import bunny
from models.loading import CheckpointError


@pytest.fixture()
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(BUNNY / "checkpoint", d)
    for f in d.iterdir():
        f.chmod(0o644)
    return d


def _edit(d, fn):
    t = load_file(str(d / "model.safetensors"))
    fn(t)
    save_file(t, str(d / "model.safetensors"))


def test_missing_tensor_is_named(ckpt):
    _edit(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        bunny.load(ckpt, torch.float32, torch.device("cpu"))


def test_unexpected_tensor_is_named(ckpt):
    _edit(ckpt, lambda t: t.__setitem__("model.extra.weight", torch.zeros(3)))
    with pytest.raises(CheckpointError, match=r"model\.extra\.weight is not used"):
        bunny.load(ckpt, torch.float32, torch.device("cpu"))


def test_wrong_shape_is_named(ckpt):
    _edit(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(7, dtype=torch.float16)))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has shape \(7,\)"):
        bunny.load(ckpt, torch.float32, torch.device("cpu"))


def test_pickle_only_checkpoint_is_refused(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(CheckpointError, match="pickle"):
        bunny.load(ckpt, torch.float32, torch.device("cpu"))


def test_dropped_layer_and_head_tolerated(ckpt):
    """A checkpoint that still carries the 27th SigLIP layer / pooling head loads (they are unused)."""
    vt = bunny.VT
    _edit(ckpt, lambda t: t.update({vt + "encoder.layers.2.mlp.fc1.weight": torch.zeros(2),
                                     vt + "head.probe": torch.zeros(1)}))
    lm = bunny.load(ckpt, torch.float32, torch.device("cpu"))
    assert len(lm.model.vision.blocks) == 2


def test_so400m_dims_without_vision_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.pop("vision_config")
    cfg.pop("mm_hidden_size")            # 96 fits the tiny tower only; absent, it follows the tower
    c = bunny.BunnyConfig.from_dict(cfg)
    assert (c.vit.width, c.vit.depth, c.vit.heads, c.vit.mlp_dim, c.n_image_tokens) == (1152, 26, 16, 4304, 729)
    assert c.vit.gelu_tanh and not c.vit.final_norm


def test_bf16_load_is_close_to_fp32(bunny_fp32, ckpt):
    lm = bunny.load(ckpt, torch.bfloat16, torch.device("cpu"))
    assert lm.model.llm.lm_head.weight.dtype == torch.bfloat16
    ids = torch.tensor([[32, 474, 485, 275]])
    with torch.inference_mode():
        a = lm.model.llm.logits(lm.model.llm(lm.model.llm.embed(ids), torch.arange(4)[None]))
        b = bunny_fp32.model.llm.logits(bunny_fp32.model.llm(bunny_fp32.model.llm.embed(ids), torch.arange(4)[None]))
    assert (a - b).abs().max() < 0.2 and a.argmax(-1).equal(b.argmax(-1))
