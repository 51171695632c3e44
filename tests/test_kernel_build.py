"""Building the CPU kernels safely: per-ISA builds, never -march=native, and failures that fall
back to PyTorch's paths with one warning (a broken compiler, a builder killed holding the lock)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from models.kernels import build
from pipeline.device import ISA_LEVELS, cpu_info

ROOT = Path(__file__).resolve().parent.parent
HAS_AVX2 = cpu_info().native_isa != "none"


def _python(code: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_builds_are_named_by_isa_and_never_native():
    assert set(build.ISA_FLAGS) == set(ISA_LEVELS[1:])
    names = {isa: build.build_name(isa) for isa in build.ISA_FLAGS}
    assert len(set(names.values())) == len(names)
    for isa, name in names.items():
        assert name.startswith(f"vlmcap_cpu_{isa}_")
    flags = [f for fl in build.ISA_FLAGS.values() for f in fl] + list(build.BASE_FLAGS)
    assert not any(f.startswith(("-march", "-mtune=native", "-mcpu")) for f in flags)
    # the AVX2 build must not be allowed to use AVX-512 instructions
    assert not any("avx512" in f for f in build.ISA_FLAGS["avx2"])
    assert build.load("none") is None


def test_another_torch_install_gets_its_own_build(monkeypatch):
    """torch rebuilds in place when its include paths change: a second venv must not share a name."""
    before = build.build_name("avx2")
    monkeypatch.setattr(torch, "__file__", "/elsewhere/venv/site-packages/torch/__init__.py")
    assert build.build_name("avx2") != before


def test_a_failed_build_falls_back_with_one_warning(tmp_path):
    """A compiler that fails: `load` gives None and says so once; the model still loads and
    captions on PyTorch's paths."""
    r = _python("""
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
        from models.kernels import build
        print("first", build.load("avx2"))
        print("second", build.load("avx2"))
        from models.registry import load_model
        from pipeline.device import CpuKernels
        lm = load_model("tests/golden/bunny-tiny/checkpoint", torch.float32, torch.device("cpu"),
                        kernels=CpuKernels(isa="avx2", linear="widening", attention="kernel"))
        print("paths:", lm.kernels)
        print("linear types:", sorted({type(m).__name__ for m in lm.model.modules() if "Linear" in type(m).__name__}))
    """, env={"CXX": "/bin/false", build.CACHE_ENV: str(tmp_path / "cache")}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "first None" in r.stdout and "second None" in r.stdout
    assert "paths: linear torch, decode attention sdpa" in r.stdout
    assert "linear types: ['Linear']" in r.stdout          # fp32 nn.Linear, nothing left in 16-bit
    warnings = [ln for ln in r.stderr.splitlines() if ln.startswith("WARNING models.kernels.build")]
    assert len(warnings) == 1 and "unavailable" in warnings[0], r.stderr[-2000:]


@pytest.mark.skipif(not HAS_AVX2, reason="no AVX2: nothing is built on this CPU")
def test_a_builder_killed_mid_build_does_not_block_later_loads():
    """A process killed while holding the build lock (and leaving torch's own lock file behind)
    must not make the next load wait: the flock dies with its holder, and the stale file is removed
    under it (torch < 2.6 waits forever on that file; newer torch locks it with flock itself)."""
    isa = cpu_info().isa if cpu_info().isa != "none" else "avx2"
    assert build.load(isa) is not None                     # built (or cached) in this process
    name = build.build_name(isa)
    lock, stale = build.cache_dir() / f"{name}.lock", build.cache_dir() / name / "lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import fcntl, os, sys, time
        fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        open({str(stale)!r}, "w").close()
        print("holding", flush=True)
        time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        t0 = time.monotonic()
        r = _python(f"""
            from models.kernels import build
            m = build.load({isa!r})
            print("loaded", m is not None)
        """, timeout=300)
        assert r.returncode == 0 and "loaded True" in r.stdout, r.stderr[-2000:]
        assert time.monotonic() - t0 < 120
    finally:
        if holder.poll() is None:
            holder.kill()


@pytest.mark.skipif(cpu_info().native_isa != "avx512bf16", reason="the AVX-512-BF16 build needs an AVX-512-BF16 CPU")
def test_the_avx512_build_loads_where_the_cpu_has_it():
    mod = build.load("avx512bf16")
    assert mod is not None
    q = torch.randn(1, 2, 64).to(torch.bfloat16)
    kv = torch.randn(1, 2, 8, 64).to(torch.bfloat16)
    out = mod.decode_attention(q, kv, kv, torch.tensor([8]), 0.125)
    assert out.shape == (1, 2, 64) and torch.isfinite(out.float()).all()
