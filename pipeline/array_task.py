"""Which part of the manifest this process takes in an array job (Slurm, Kubernetes, plain loops).

Shard s belongs to task s % N, so N tasks split one manifest with no coordination and the
work stays balanced whatever the manifest order. The task index comes from --shard-index, else
from the scheduler's environment:
    Slurm job arrays     SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN, N = SLURM_ARRAY_TASK_COUNT
    Kubernetes Indexed   JOB_COMPLETION_INDEX (N must be given: --num-shards-total)
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

from pipeline.config import ArraySlice
from pipeline.errors import JobError

log = logging.getLogger(__name__)


def _int(env: Mapping[str, str], name: str) -> int | None:
    v = env.get(name)
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        raise JobError(f"environment variable {name}={v!r} is not an integer") from None


def resolve(total: int | None, index: int | None, env: Mapping[str, str] | None = None) -> ArraySlice:
    env = os.environ if env is None else env
    source = "--shard-index"
    if index is None:
        slurm = _int(env, "SLURM_ARRAY_TASK_ID")
        k8s = _int(env, "JOB_COMPLETION_INDEX")
        if slurm is not None and (total is not None or _int(env, "SLURM_ARRAY_TASK_COUNT") is not None):
            index = slurm - (_int(env, "SLURM_ARRAY_TASK_MIN") or 0)
            total = total if total is not None else _int(env, "SLURM_ARRAY_TASK_COUNT")
            source = "SLURM_ARRAY_TASK_ID"
        elif k8s is not None and total is not None:
            index, source = k8s, "JOB_COMPLETION_INDEX"
    if total is None:
        if index not in (None, 0):
            raise JobError("--shard-index needs --num-shards-total")
        return ArraySlice()
    if total < 1:
        raise JobError(f"--num-shards-total must be at least 1 (got {total})")
    if index is None:
        raise JobError("--num-shards-total needs --shard-index (or SLURM_ARRAY_TASK_ID / JOB_COMPLETION_INDEX)")
    if not 0 <= index < total:
        raise JobError(f"shard index {index} (from {source}) is outside 0..{total - 1}")
    if total > 1:
        log.info("array task %d of %d (index from %s)", index, total, source)
    return ArraySlice(index=index, total=total)
