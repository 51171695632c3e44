"""Shared fixtures: golden data paths and loaded tiny models (loaded once per session)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

GOLDEN = Path(__file__).parent / "golden"
BUNNY = GOLDEN / "bunny-tiny"


@pytest.fixture(scope="session")
def bunny_golden() -> dict:
    return json.loads((BUNNY / "expected.json").read_text())


@pytest.fixture(scope="session")
def bunny_tensors() -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(BUNNY / "expected.safetensors"))


# fp32 golden parity runs on both CPU paths: PyTorch's own ops, and our kernels (fp32 compute with
# the checkpoint's 16-bit weights widened in the GEMM + the decode-attention kernel), which must
# stay token-exact. The kernels' ISA is the best this CPU has (forced lower with VLMCAP_CPU_ISA).
FP32_PATHS = ["torch", "cpu-kernels"]


def load_fp32(ckpt: Path, path: str):
    """A golden checkpoint in fp32 through one CPU path (skips where our kernels cannot run)."""
    from models.registry import load_model
    from pipeline.device import CpuKernels, cpu_info

    cpu = torch.device("cpu")
    if path == "torch":
        return load_model(ckpt, torch.float32, cpu)
    isa = cpu_info().isa
    if isa == "none":
        pytest.skip("this CPU has no AVX2: the kernels are not built here")
    lm = load_model(ckpt, torch.float32, cpu, kernels=CpuKernels(isa=isa, linear="widening", attention="kernel"))
    if "widening" not in lm.kernels or "kernel" not in lm.kernels:
        pytest.fail(f"CPU kernels failed to build on an {isa} CPU: {lm.kernels}")
    return lm


@pytest.fixture(scope="session", params=FP32_PATHS)
def bunny_fp32(request):
    return load_fp32(BUNNY / "checkpoint", request.param)
