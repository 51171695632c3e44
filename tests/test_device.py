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


ZEN3 = {"fpu", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
ZEN5 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_vnni"}
SPR = ZEN5 | {"amx_bf16", "amx_tile"}
ARM = {"fp", "asimd", "bf16"}         # aarch64 "Features": none of our x86 kernels apply


@pytest.fixture()
def fake_cpu(monkeypatch):
    """Pretend to be a CPU with the given flags (and optionally VLMCAP_CPU_ISA); restores the cache."""
    def set_cpu(flags: set[str], force: str | None = None) -> dev.CpuInfo:
        monkeypatch.setattr(dev, "_cpu_flags", lambda: ("Test CPU", set(flags)))
        if force is None:
            monkeypatch.delenv(dev.FORCE_ISA_ENV, raising=False)
        else:
            monkeypatch.setenv(dev.FORCE_ISA_ENV, force)
        dev.cpu_info.cache_clear()
        return dev.cpu_info()
    yield set_cpu
    dev.cpu_info.cache_clear()


@pytest.mark.parametrize("flags,isa,dtype,linear,attention", [
    (ZEN3, "avx2", torch.float32, "widening", "kernel"),
    (ZEN5, "avx512bf16", torch.bfloat16, "onednn-bf16", "kernel"),
    (SPR, "avx512bf16", torch.bfloat16, "onednn-bf16", "kernel"),
    (ARM, "none", torch.float32, "torch", "sdpa"),
])
def test_cpu_policy_follows_the_isa(fake_cpu, flags, isa, dtype, linear, attention):
    """The positive and negative cases: auto dtype, and the fast paths that dtype gets."""
    cpu = torch.device("cpu")
    info = fake_cpu(flags)
    assert info.isa == info.native_isa == isa
    assert info.native_bf16 == (isa == "avx512bf16") and info.amx == ("amx_bf16" in flags)
    assert dev.resolve_dtype("auto", cpu) == dtype
    assert dev.cpu_kernels(cpu, dtype) == dev.CpuKernels(isa=isa, linear=linear, attention=attention)
    # an explicit dtype gets the path that fits it, never one the CPU cannot run
    assert dev.cpu_kernels(cpu, torch.float16) == dev.CpuKernels(isa=isa, linear="torch", attention="sdpa")
    bf16 = dev.cpu_kernels(cpu, torch.bfloat16)
    assert bf16.linear == ("onednn-bf16" if isa == "avx512bf16" else "torch")
    assert dev.cpu_kernels(types.SimpleNamespace(type="cuda"), torch.bfloat16) is None


def test_forcing_a_lower_isa_takes_the_lower_paths(fake_cpu):
    """VLMCAP_CPU_ISA=avx2 on an AVX-512-BF16 CPU: fp32 + widening GEMM, as on a Zen 3."""
    info = fake_cpu(ZEN5, force="avx2")
    assert (info.native_isa, info.isa, info.native_bf16) == ("avx512bf16", "avx2", False)
    cpu = torch.device("cpu")
    assert dev.resolve_dtype("auto", cpu) == torch.float32
    assert dev.cpu_kernels(cpu, torch.float32).linear == "widening"
    assert dev.cpu_kernels(cpu, torch.bfloat16).linear == "torch"      # oneDNN's bf16 reorder would refuse
    assert "forced" in info.describe()
    assert fake_cpu(ZEN5, force="none").isa == "none"


@pytest.mark.parametrize("force", ["avx512bf16", "sse9"])
def test_forcing_a_higher_or_unknown_isa_is_ignored(fake_cpu, force, caplog):
    """Never load code the CPU cannot run (SIGILL cannot be caught)."""
    assert fake_cpu(ZEN3, force=force).isa == "avx2"
    assert dev.FORCE_ISA_ENV in caplog.text


def test_explicit_dtypes(fake_cpu):
    cpu = torch.device("cpu")
    fake_cpu(ZEN3)
    assert dev.resolve_dtype("float16", cpu) == torch.float16
    assert dev.resolve_dtype("bf16", cpu) == torch.bfloat16
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


def test_this_machine_agrees_with_torch():
    """Our ISA reading and PyTorch's own dispatch level describe the same CPU."""
    info = dev.cpu_info()
    cap = info.torch_capability
    allowed = {"AVX2": {"avx2"}, "AVX512": {"avx2", "avx512bf16"}, "DEFAULT": {"none"}}.get(cap)
    if allowed is not None and dev.FORCE_ISA_ENV not in __import__("os").environ:
        assert info.native_isa in allowed, (cap, info)
    assert dev.resolve_dtype("auto", torch.device("cpu")) == (torch.bfloat16 if info.native_bf16 else torch.float32)
