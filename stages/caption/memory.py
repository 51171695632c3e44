"""Memory planner: how many KV-cache slots fit the budget.

The budget is `--memory-budget` GiB if given, else 70 % of the memory available now (host RAM
for CPU, free device memory for CUDA/NPU) — the weights are already loaded at this point, so what
is available is what the cache and activations may use. Each slot costs its KV cache plus an
allowance for activations (prefill of one ~800-token row is the peak).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

ACTIVATION_ALLOWANCE = 1.5     # slot bytes x this: KV plus per-row activations and logits


def available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "npu":
        free, _ = torch.npu.mem_get_info(device)
        return int(free)
    import psutil
    return int(psutil.virtual_memory().available)


def plan_slots(slot_bytes: int, options, device: torch.device) -> int:
    """Slots = min(max_batch_size or slot_cap, budget // (slot_bytes x allowance)), >= 1."""
    if options.memory_budget_gib is not None:
        budget = int(options.memory_budget_gib * 2**30)
    else:
        budget = int(0.7 * available_bytes(device))
    fit = max(1, int(budget // max(1, slot_bytes * ACTIVATION_ALLOWANCE)))
    cap = options.max_batch_size or options.slot_cap
    slots = max(1, min(cap, fit))
    if options.max_batch_size and slots < options.max_batch_size:
        log.warning("memory budget fits %d slots, fewer than --max-batch-size %d", slots, options.max_batch_size)
    return slots


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg
