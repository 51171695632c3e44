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


@pytest.fixture(scope="session")
def bunny_fp32():
    from models import bunny
    return bunny.load(BUNNY / "checkpoint", torch.float32, torch.device("cpu"))
