"""check_checkpoint (headers only) agrees with a real load, on generated inputs:
- the closed-form parameter counts equal the built modules' numel for generated configs;
- a golden checkpoint with one generated defect (a tensor dropped, reshaped, added, stored as
  int, or a size field of config.json changed) is refused by the check exactly when the real
  load refuses it, and a tensor-level defect with the same one-line message."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from safetensors.torch import load_file, save_file

from models import bunny, minicpmv2
from models.loading import CheckpointError
from models.registry import check_checkpoint

GOLDEN = Path(__file__).resolve().parent / "golden"
CKPTS = {"bunny": GOLDEN / "bunny-tiny" / "checkpoint", "minicpmv2": GOLDEN / "minicpmv2-tiny" / "checkpoint"}
FAMILY = {"bunny": (bunny, bunny.BunnyConfig, bunny.Bunny), "minicpmv2": (minicpmv2, minicpmv2.MiniCPMV2Config,
                                                                          minicpmv2.MiniCPMV2)}


@st.composite
def configs(draw, family: str) -> dict:
    heads = draw(st.integers(1, 4))
    kv = draw(st.sampled_from([d for d in range(1, heads + 1) if heads % d == 0]))
    head_dim = 2 * draw(st.integers(1, 16))
    v_heads = draw(st.integers(1, 4))
    v_width = v_heads * draw(st.integers(1, 12))
    c = json.loads((CKPTS[family] / "config.json").read_text())
    c.update(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * head_dim,
             num_hidden_layers=draw(st.integers(1, 3)), intermediate_size=draw(st.integers(1, 64)),
             vocab_size=draw(st.integers(32, 300)), eos_token_id=3)
    if family == "bunny":
        patch = draw(st.integers(4, 64))
        c["vision_config"].update(hidden_size=v_width, num_attention_heads=v_heads, patch_size=patch,
                                  num_hidden_layers=draw(st.integers(2, 4)), intermediate_size=draw(st.integers(1, 64)),
                                  image_size=patch * draw(st.integers(1, 6)) + draw(st.integers(0, patch - 1)))
        c["mm_hidden_size"] = v_width
    else:
        # the resampler needs hidden % 4 == 0 and hidden // 128 heads dividing it: stay below 128 x 2
        c["hidden_size"] = 128 * draw(st.integers(1, 2))
        c["num_attention_heads"] = c["num_key_value_heads"] = draw(st.sampled_from([1, 2, 4, 8]))
        c["vision_config"].update(embed_dim=v_width, num_heads=v_heads, depth=draw(st.integers(2, 4)),
                                  mlp_ratio=draw(st.floats(1.0, 4.0)), patch_size=14, img_size=14 * draw(st.integers(1, 5)))
        c["query_num"] = draw(st.sampled_from([1, 4, 16, 64]))
    return c


def _count_vs_module(family, data):
    module, config_cls, model_cls = FAMILY[family]
    cfg = config_cls.from_dict(data.draw(configs(family)))
    with torch.device("meta"):
        model = model_cls(cfg)
    assert module.parameter_count(cfg) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", ["bunny", "minicpmv2"])
@settings(max_examples=40, deadline=None, derandomize=True)
@given(data=st.data())
def test_parameter_count_equals_the_built_module(family, data):
    _count_vs_module(family, data)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bunny", "minicpmv2"])
@settings(max_examples=1000, deadline=None)
@given(data=st.data())
def test_parameter_count_equals_the_built_module_many(family, data):
    _count_vs_module(family, data)


# -- one defect, check vs load ---------------------------------------------------------------------

def _defect(draw, family: str, tensors: dict[str, torch.Tensor], config: dict) -> str:
    names = sorted(tensors)
    kind = draw(st.sampled_from(["drop", "reshape", "add", "int", "config"]))
    name = draw(st.sampled_from(names))
    if kind == "drop":
        tensors.pop(name)
    elif kind == "reshape":
        t = tensors[name]
        dim = draw(st.integers(0, t.dim() - 1))
        shape = list(t.shape)
        shape[dim] += draw(st.sampled_from([-1, 1, 2]))
        tensors[name] = torch.zeros([max(s, 1) for s in shape], dtype=t.dtype)
    elif kind == "add":
        tensors[name.rsplit(".", 1)[0] + ".extra_" + str(draw(st.integers(0, 9)))] = torch.zeros(3, dtype=torch.float16)
    elif kind == "int":
        tensors[name] = tensors[name].to(torch.int32)
    else:
        field = draw(st.sampled_from(["num_hidden_layers", "intermediate_size", "vocab_size"]))
        config[field] = config[field] + draw(st.sampled_from([-1, 1, 7]))
    return kind


def _check_vs_load(family, data, tmp_path_factory):
    d = tmp_path_factory.mktemp(family)
    shutil.copytree(CKPTS[family], d, dirs_exist_ok=True)
    tensors = load_file(str(d / "model.safetensors"))
    config = json.loads((d / "config.json").read_text())
    kind = _defect(data.draw, family, tensors, config)
    save_file(tensors, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))

    module = FAMILY[family][0]
    try:
        module.load(d, torch.float32, torch.device("cpu"))
        loaded = None
    except CheckpointError as e:
        loaded = str(e)
    try:
        check_checkpoint(d)
        checked = None
    except CheckpointError as e:
        checked = str(e)
    assert (checked is None) == (loaded is None), (kind, checked, loaded)
    if kind in ("drop", "reshape", "add") and loaded is not None:
        assert checked == loaded                   # the same strict checks, on shapes instead of data


@pytest.mark.parametrize("family", ["bunny", "minicpmv2"])
@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_check_refuses_exactly_what_the_load_refuses(family, data, tmp_path_factory):
    _check_vs_load(family, data, tmp_path_factory)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bunny", "minicpmv2"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_check_refuses_exactly_what_the_load_refuses_many(family, data, tmp_path_factory):
    _check_vs_load(family, data, tmp_path_factory)
