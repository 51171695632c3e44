"""The ONLY module that knows about cpu / cuda / npu: resolution, dtype policy, sync, memory.

`torch_npu` is imported only when an NPU is asked for (or probed by `auto`), never at import time.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


class DeviceError(RuntimeError):
    """The asked-for device or dtype cannot be used here; the message says what to do."""


def _npu_available() -> bool:
    try:
        import torch_npu  # noqa: F401  (registers the "npu" device type)
    except ImportError:
        return False
    return bool(getattr(torch, "npu", None)) and torch.npu.is_available()


def auto_spec() -> str:
    """What 'auto' means here: an NPU if torch_npu sees one, else a CUDA GPU, else the CPU."""
    if _npu_available():
        return "npu:0"
    if torch.cuda.is_available():
        return "cuda:0"
    return "cpu"


def resolve_device(spec: str = "auto") -> torch.device:
    """'auto' | 'cpu' | 'cuda[:i]' | 'npu[:i]' -> torch.device, or a DeviceError with a hint."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = auto_spec()
    kind, _, idx = spec.partition(":")
    if idx and not idx.isdigit():
        raise DeviceError(f"bad device {spec!r}: use auto, cpu, cuda[:i] or npu[:i]")
    if kind == "cpu":
        if idx:
            raise DeviceError(f"bad device {spec!r}: cpu takes no index")
        return torch.device("cpu")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {spec!r} asked for but no CUDA GPU is visible to torch "
                              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        i = int(idx or 0)
        if i >= torch.cuda.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", i)
    if kind == "npu":
        try:
            import torch_npu  # noqa: F401
        except ImportError as e:
            raise DeviceError("device 'npu' needs torch_npu: pip install 'vlm-caption-pipeline[npu]' "
                              "(with the CANN toolkit matching your Ascend driver)") from e
        if not torch.npu.is_available():
            raise DeviceError(f"device {spec!r}: torch_npu is installed but sees no Ascend NPU")
        i = int(idx or 0)
        if i >= torch.npu.device_count():
            raise DeviceError(f"device {spec!r}: only {torch.npu.device_count()} NPU(s) visible")
        return torch.device("npu", i)
    raise DeviceError(f"unknown device {spec!r}: use auto, cpu, cuda[:i] or npu[:i]")


# -- the CPU: one place that knows its ISA ------------------------------------------------------
# Kernel ISA levels, lowest first (models/kernels/build.py compiles one extension per level).
ISA_LEVELS = ("none", "avx2", "avx512bf16")
ISA_NEEDS = {"avx2": {"avx2", "fma", "f16c"},
             "avx512bf16": {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"}}
FORCE_ISA_ENV = "VLMCAP_CPU_ISA"      # force a LOWER level (tests, or to compare paths); never a higher one


@dataclass(frozen=True)
class CpuInfo:
    model: str                  # /proc/cpuinfo "model name"
    torch_capability: str       # torch.backends.cpu.get_cpu_capability(): DEFAULT | AVX2 | AVX512 | ...
    native_isa: str             # the highest ISA level the CPU supports
    isa: str                    # the level in use (native unless forced lower)
    amx: bool                   # AMX-BF16 tiles (Sapphire Rapids and later)

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run natively (AVX-512-BF16 or AMX); also what oneDNN's bf16 weight reorder
        needs (it refuses to run on plain AVX2)."""
        return self.isa == "avx512bf16"

    def describe(self) -> str:
        forced = f" (forced; CPU has {self.native_isa})" if self.isa != self.native_isa else ""
        return f"{self.model}, ISA {self.isa}{forced}, torch {self.torch_capability}{', AMX' if self.amx else ''}"


def _cpu_flags() -> tuple[str, set[str]]:
    try:
        text = open("/proc/cpuinfo", encoding="ascii", errors="ignore").read()
    except OSError:
        return "unknown CPU", set()
    model, flags = "unknown CPU", set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and model == "unknown CPU":
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=None)
def cpu_info() -> CpuInfo:
    """What this CPU can run (cached; `cpu_info.cache_clear()` after changing VLMCAP_CPU_ISA)."""
    model, flags = _cpu_flags()
    native = "none"
    for level in ISA_LEVELS[1:]:
        if ISA_NEEDS[level] <= flags:
            native = level
    isa = native
    forced = os.environ.get(FORCE_ISA_ENV, "").strip().lower()
    if forced:
        if forced not in ISA_LEVELS:
            log.warning("%s=%s ignored: use one of %s", FORCE_ISA_ENV, forced, ", ".join(ISA_LEVELS))
        elif ISA_LEVELS.index(forced) > ISA_LEVELS.index(native):
            log.warning("%s=%s ignored: this CPU only supports %s", FORCE_ISA_ENV, forced, native)
        else:
            isa = forced
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = "unknown"
    return CpuInfo(model=model, torch_capability=capability, native_isa=native, isa=isa,
                   amx="amx_bf16" in flags and isa == "avx512bf16")


def cpu_has_bf16() -> bool:
    """bf16 matmuls are native and fast on this CPU (at the ISA level in use)."""
    return cpu_info().native_bf16


@dataclass(frozen=True)
class CpuKernels:
    """Which CPU fast paths a model uses; decided here, applied by models/registry.load_model.

    linear:    "onednn-bf16"  bf16 weights pre-reordered for oneDNN (native bf16 CPUs, bf16 dtype)
               "widening"     fp32 compute, weights kept as the checkpoint stores them (16-bit) and
                              widened in the GEMM kernel (any AVX2 CPU, fp32 dtype)
               "torch"        PyTorch's own F.linear
    attention: "kernel"       our decode-attention kernel (fp32 or bf16 KV cache)
               "sdpa"         PyTorch's scaled_dot_product_attention
    isa:       which build of our kernels ("avx2" | "avx512bf16" | "none")
    """

    isa: str
    linear: str
    attention: str

    def describe(self) -> str:
        return f"linear {self.linear}, decode attention {self.attention} (kernels: {self.isa})"


def cpu_kernels(device: torch.device, dtype: torch.dtype) -> CpuKernels | None:
    """The CPU fast paths for this device/dtype (None off the CPU). Where our kernels cannot be
    built, the loader falls back to the torch paths with one warning."""
    if device.type != "cpu":
        return None
    info = cpu_info()
    kernels = info.isa != "none"
    if dtype == torch.bfloat16:
        linear = "onednn-bf16" if info.native_bf16 else "torch"
    elif dtype == torch.float32:
        linear = "widening" if kernels else "torch"
    else:
        linear = "torch"
    attention = "kernel" if kernels and dtype in (torch.float32, torch.bfloat16) else "sdpa"
    return CpuKernels(isa=info.isa, linear=linear, attention=attention)


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto' applies the per-device policy; other names map directly."""
    spec = (spec or "auto").strip().lower()
    if spec != "auto":
        if spec not in DTYPES:
            raise DeviceError(f"unknown dtype {spec!r}: use auto, float32, bfloat16 or float16")
        return DTYPES[spec]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else torch.float32
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "npu":
        name = torch.npu.get_device_name(device.index or 0)
        # 910B / 800I A2 support bf16; 310P (300I DUO) only fp16.
        return torch.bfloat16 if "910" in name else torch.float16
    return torch.float32


def set_threads(n: int | None) -> None:
    """CPU threads for intra-op parallelism (default: what torch picked, i.e. all cores)."""
    if n:
        torch.set_num_threads(n)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "npu":
        torch.npu.synchronize(device)


def describe(device: torch.device) -> str:
    if device.type == "cpu":
        return f"cpu ({cpu_info().describe()}; {torch.get_num_threads()} threads)"
    if device.type == "cuda":
        return f"cuda:{device.index} ({torch.cuda.get_device_name(device)})"
    if device.type == "npu":
        return f"npu:{device.index} ({torch.npu.get_device_name(device.index or 0)})"
    return str(device)


def peak_rss_bytes() -> int:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -- Ray (--engine ray): the cluster resource each device kind is scheduled by ----------------------
# Ray counts CUDA GPUs as "GPU" (and sets CUDA_VISIBLE_DEVICES per actor) and Ascend NPUs as "NPU"
# (its Ascend accelerator manager sets ASCEND_RT_VISIBLE_DEVICES), so inside an actor the device it
# was given is always index 0 and the actor is handed the bare kind.
RAY_RESOURCE = {"cuda": "GPU", "npu": "NPU"}


def device_kind(spec: str) -> str | None:
    """'cuda:1' -> 'cuda', 'cpu' -> 'cpu'; 'auto' -> None (decided by what the cluster has)."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return None
    kind, _, idx = spec.partition(":")
    if kind not in ("cpu", "cuda", "npu") or (idx and not idx.isdigit()) or (kind == "cpu" and idx):
        raise DeviceError(f"bad device {spec!r}: use auto, cpu, cuda[:i] or npu[:i]")
    return kind


def cluster_device_kind(spec: str, resources: dict[str, float]) -> str:
    """The device kind a Ray run uses, given the cluster's total resources ({"GPU": 8.0, ...}):
    `auto` prefers NPUs, then GPUs, then CPUs, like auto_spec() on one machine."""
    kind = device_kind(spec)
    if kind is None:
        return next((k for k in ("npu", "cuda") if resources.get(RAY_RESOURCE[k], 0) >= 1), "cpu")
    if kind in RAY_RESOURCE and resources.get(RAY_RESOURCE[kind], 0) < 1:
        raise DeviceError(f"device {spec!r} asked for, but the Ray cluster has no {RAY_RESOURCE[kind]} resource "
                          f"(it has: {', '.join(sorted(k for k in resources if k.isupper() or k == 'CPU'))})")
    return kind


def ray_actor_options(kind: str, num_cpus: float) -> dict:
    """ray.remote options for one model actor: one accelerator (whole, never shared) plus CPUs."""
    if kind == "cpu":
        return {"num_cpus": num_cpus}
    if kind == "cuda":
        return {"num_cpus": num_cpus, "num_gpus": 1}
    return {"num_cpus": num_cpus, "resources": {RAY_RESOURCE[kind]: 1}}
