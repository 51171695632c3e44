"""Memory planner: how many KV-cache slots of a given length fit the budget.

The budget is `--memory-budget` GiB if given, else 70 % of the memory available when the engine
first plans (host RAM for CPU, free device memory for CUDA/NPU) — the weights are already loaded
then, so what is available is what the cache and activations may use. It is fixed for the
engine's life: when the cache grows, its slot count is re-planned against the same budget (not
against what is left after the current cache). Each slot costs its KV cache plus an allowance
for activations (prefill of one ~800-token row is the peak).
"""

from __future__ import annotations

import torch

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


def budget_bytes(options, device: torch.device) -> int:
    """The bytes the KV cache and activations may use: --memory-budget, else 70 % of what is
    available now (the weights are loaded at this point)."""
    if options.memory_budget_gib is not None:
        return int(options.memory_budget_gib * 2**30)
    return int(0.7 * available_bytes(device))


def plan_slots(slot_bytes: int, options, device: torch.device, budget: int | None = None) -> int:
    """Slots = min(max_batch_size or slot_cap, budget // (slot_bytes x allowance)), >= 1."""
    if budget is None:
        budget = budget_bytes(options, device)
    fit = max(1, int(budget // max(1, slot_bytes * ACTIVATION_ALLOWANCE)))
    cap = options.max_batch_size or options.slot_cap
    return max(1, min(cap, fit))
