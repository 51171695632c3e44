"""Building and loading the CPU kernels: one C++ extension per ISA, compiled on first use.

Why compile on first use: the kernels need the installed torch's headers and ABI, and a wheel of
our own per torch version would be a build farm; a compiler is on every machine that builds
Python packages. Where the build cannot happen (no compiler, no headers, a read-only cache), the
callers keep PyTorch's own paths, after one warning.

Safety rules, because a cache directory may be shared by machines with different CPUs (a `$HOME`
on NFS across a cluster):
- the code is compiled with the flags of a named ISA level, never `-march=native`, and only the
  level the running CPU supports is ever loaded (pipeline/device.py decides it), so a binary
  built on an AVX-512 node is never loaded on an AVX2 node (SIGILL cannot be caught);
- the ISA, the source digest, the flags, the torch version and the torch/Python install paths
  are all in the build's name, so a cached build is only reused for exactly what it was built
  for, and two installs sharing one cache never rebuild each other's entry;
- builds are serialised with our own `flock` (released by the kernel when a builder dies), and
  under it a lock file left by torch's own build step in a killed process is removed — that file
  would otherwise make every later load wait forever.

ISA levels: "avx2" (AVX2 + FMA + F16C: Zen 2/3/4/5, Intel Haswell and later) and "avx512bf16"
(adds AVX-512 F/BW/VL/DQ + BF16: Zen 4/5, Cooper Lake, Sapphire Rapids and later).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
SOURCES = ("linear.cpp", "attention.cpp", "module.cpp")
BASE_FLAGS = ("-O3", "-fopenmp")
ISA_FLAGS: dict[str, tuple[str, ...]] = {
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512bf16": ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
                   "-mavx512bf16"),
}
CACHE_ENV = "VLMCAP_KERNEL_CACHE"          # where builds go (default: the user cache)
LOCK_TIMEOUT_S = 900.0                     # a live build of ours takes ~1-2 min; beyond this, give up

_guard = threading.Lock()
_loaded: dict[str, object | None] = {}


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "vlm-caption-pipeline" / "kernels")


def build_name(isa: str) -> str:
    """vlmcap_cpu_<isa>_<digest of sources, flags, torch version and where torch and Python's
    headers are>. The install paths count because torch records its include paths in the build
    file and rebuilds in place when they differ: two virtualenvs sharing one cache (a CI clone
    beside a checkout, venvs per project on one `$HOME`) would otherwise rebuild each other's
    entry on every first load (~50 s of compiler CPU each time, measured on the Zen 3)."""
    import sysconfig

    import torch

    h = hashlib.sha256()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (HERE / name).read_bytes())
    h.update(" ".join(BASE_FLAGS + ISA_FLAGS[isa]).encode())
    h.update(f"torch {torch.__version__} py {sys.version_info[0]}.{sys.version_info[1]}".encode())
    h.update(f"{Path(torch.__file__).resolve().parent}\0{sysconfig.get_paths()['include']}".encode())
    return f"vlmcap_cpu_{isa}_{h.hexdigest()[:12]}"


def load(isa: str):
    """The compiled extension for `isa` (ops: widening_linear, decode_attention), or None where it
    cannot be built here (one warning; callers fall back to PyTorch's paths)."""
    if isa not in ISA_FLAGS:
        return None
    with _guard:
        if isa not in _loaded:
            t0 = time.perf_counter()
            try:
                _loaded[isa] = _build(isa)
                log.debug("CPU kernels (%s) ready in %.1f s", isa, time.perf_counter() - t0)
            except Exception as e:  # noqa: BLE001 - no compiler, no headers, lock timeout, ...: fall back
                _loaded[isa] = None
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                log.warning("CPU kernels (%s) unavailable, using PyTorch's own paths: %s", isa, first)
        return _loaded[isa]


def _build(isa: str):
    # cpp_extension warns "No CUDA runtime is found" (at import) on every CPU-only machine: not
    # our concern here
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.cpp_extension import load as load_extension

    name = build_name(isa)
    root = cache_dir()
    build_dir = root / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _ninja_on_path()
    with _exclusive(root / f"{name}.lock"):
        # torch's FileBaton: a file `lock` in the build dir while torch builds; a killed build
        # leaves it and every later load would wait for it forever. Under our flock no live
        # process of ours is building this name, so any such file is stale.
        (build_dir / "lock").unlink(missing_ok=True)
        return load_extension(name=name, sources=_sources_in(build_dir),
                              extra_cflags=list(BASE_FLAGS + ISA_FLAGS[isa]), extra_ldflags=["-fopenmp"],
                              build_directory=str(build_dir), verbose=False)


def _sources_in(build_dir: Path) -> list[str]:
    """The sources copied into the build dir, built from there: torch records the sources' paths in
    its build file, so building from each checkout's own copy would make two installs (or two git
    worktrees) with the same sources rebuild each other's cache entry over and over."""
    src = build_dir / "src"
    src.mkdir(exist_ok=True)
    out = []
    for name in SOURCES:
        data, dst = (HERE / name).read_bytes(), src / name
        if not dst.is_file() or dst.read_bytes() != data:
            tmp = dst.with_name(f".{name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, dst)
        out.append(str(dst))
    return out


@contextmanager
def _exclusive(path: Path):
    """flock(path) with a timeout; the kernel releases it if the holder dies."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"another process has been building {path.stem} for "
                                       f"{LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.5)
        yield
    finally:
        os.close(fd)


def _ninja_on_path() -> None:
    """The `ninja` wheel puts its binary next to this interpreter, which may not be on PATH when
    the venv is not activated (`.venv/bin/python -m ...`)."""
    if shutil.which("ninja") is None:
        os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
