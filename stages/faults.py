"""Which failures belong to an image and which to the machine (docs/CLI.md: exit 1 = infrastructure).

An out-of-memory, device or driver error is the machine's: the stage re-raises it, the shard is
not committed, the process exits 1 and a re-run retries the shard. Any other error is retried one
image at a time; only an image whose error recurs when it runs alone gets an error row. Inputs
are bounded before they reach a model (pixel caps, a fixed number of crops, prompt length
checks), so no single valid image can legitimately exhaust memory: an OOM is never the image's.

A device that fails without a recognisable message would turn every image into an error row; a
streak of per-image failures with no success in between is therefore treated as infrastructure.
"""

from __future__ import annotations

import torch

# Messages of device/driver failures that torch raises as plain RuntimeErrors (CUDA/ROCm through
# older code paths, Ascend through torch_npu, whose errors carry ACL/HCCL error codes).
_DEVICE_MARKERS = ("CUDA error", "CUDA driver", "CUBLAS_STATUS_", "CUDNN_STATUS_", "cuDNN error", "NCCL error",
                   "device-side assert", "HIP error", "call acl api failed", "ACL stream", "NPU function error",
                   "HCCL", "EZ9999", "EE9999")
STREAK_LIMIT = 8          # consecutive per-image failures that mean the device, not the images


class InfrastructureError(RuntimeError):
    """A failure of the machine, found by its pattern rather than its message."""


def is_oom(e: BaseException) -> bool:
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    msg = str(e).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "not enough memory" in msg


def is_infrastructure(e: BaseException) -> bool:
    """OOM, device or driver failure: not caused by any one image."""
    if isinstance(e, (InfrastructureError, torch.AcceleratorError)) or is_oom(e):
        return True
    msg = str(e)
    return any(m in msg for m in _DEVICE_MARKERS)


class FailureStreak:
    """Counts per-image failures since the last success; too many in a row is infrastructure."""

    def __init__(self, stage: str, limit: int = STREAK_LIMIT):
        self.stage = stage
        self.limit = limit
        self.count = 0

    def ok(self) -> None:
        self.count = 0

    def failed(self, error: str) -> None:
        self.count += 1
        if self.count >= self.limit:
            raise InfrastructureError(f"{self.count} images in a row failed in {self.stage} (last: {error}); "
                                      "that is the device or the model, not the images")
