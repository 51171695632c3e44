"""Device resolution and dtype policy (absent CUDA / NPU simulated with monkeypatch)."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from pipeline import device as dev
from pipeline.device import DeviceError


@pytest.fixture()
def no_accelerators(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)      # import torch_npu -> ImportError


def test_auto_falls_back_to_cpu(no_accelerators):
    assert dev.resolve_device("auto") == torch.device("cpu")
    assert dev.resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_cuda_when_present(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert dev.auto_spec() == "cuda:0"
    assert dev.resolve_device("auto") == torch.device("cuda:0")


def test_auto_prefers_npu_over_cuda(monkeypatch):
    # torch.device("npu") itself needs the real torch_npu backend, so check the decision
    monkeypatch.setitem(sys.modules, "torch_npu", types.ModuleType("torch_npu"))
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: True), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.auto_spec() == "npu:0"
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(is_available=lambda: False), raising=False)
    assert dev.auto_spec() == "cuda:0"


def test_npu_without_torch_npu_names_the_extra(no_accelerators):
    with pytest.raises(DeviceError, match=r"pip install 'vlm-caption-pipeline\[npu\]'"):
        dev.resolve_device("npu")
    with pytest.raises(DeviceError, match="torch_npu"):
        dev.resolve_device("npu:1")


def test_cuda_absent_is_a_clear_error(no_accelerators):
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        dev.resolve_device("cuda:0")


@pytest.mark.parametrize("spec", ["gpu", "cuda:x", "cpu:1", "tpu", "npu:-1"])
def test_bad_device_strings(spec, no_accelerators):
    with pytest.raises(DeviceError):
        dev.resolve_device(spec)


def test_cpu_dtype_policy(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: True)
    assert dev.resolve_dtype("auto", cpu) == torch.bfloat16
    monkeypatch.setattr(dev, "cpu_has_bf16", lambda: False)
    assert dev.resolve_dtype("auto", cpu) == torch.float32
    assert dev.resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(DeviceError, match="unknown dtype"):
        dev.resolve_dtype("int8", cpu)


@pytest.mark.parametrize("major,expected", [(9, torch.bfloat16), (8, torch.bfloat16), (7, torch.float16)])
def test_cuda_dtype_policy(monkeypatch, major, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (major, 0))
    assert dev.resolve_dtype("auto", torch.device("cuda", 0)) == expected


@pytest.mark.parametrize("name,expected", [("Ascend910B3", torch.bfloat16), ("Ascend310P3", torch.float16)])
def test_npu_dtype_policy(monkeypatch, name, expected):
    monkeypatch.setattr(torch, "npu", types.SimpleNamespace(get_device_name=lambda i=0: name), raising=False)
    fake = types.SimpleNamespace(type="npu", index=0)     # a torch.device("npu") needs real torch_npu
    assert dev.resolve_dtype("auto", fake) == expected


def test_this_machine_cpu_dtype_matches_its_flags():
    flags = open("/proc/cpuinfo").read()
    want = torch.bfloat16 if (" avx512_bf16" in flags or " amx_bf16" in flags) else torch.float32
    assert dev.resolve_dtype("auto", torch.device("cpu")) == want


def test_packed_linear_policy():
    assert not dev.prefers_cpu_kernels(torch.device("cpu"), torch.float32)
    assert not dev.prefers_cpu_kernels(types.SimpleNamespace(type="cuda"), torch.bfloat16)
