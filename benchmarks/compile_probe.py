"""Does torch.compile speed up the decode step on this CPU? (issue: keep what is faster)

Compares, for the same full-size random checkpoint and a fixed cache length, the median decode
step of: eager + plain nn.Linear + SDPA ("eager-plain"), eager with the CPU fast paths the engine
uses (oneDNN-packed Linear + the decode-attention kernel: "eager-packed"), and torch.compile
(inductor, CPU C++ codegen, weights frozen so inductor packs them itself) of the plain model.

    python benchmarks/compile_probe.py --family bunny --batches 1,8 --out benchmarks/results/compile_probe.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from models.kv_cache import CacheShape, KVCache
from models.random_checkpoint import write_random_checkpoint
from models.registry import load_model
from pipeline.device import cpu_kernels

log = logging.getLogger("compile_probe")


def step_time(llm, batch: int, context: int, reps: int) -> float:
    c = llm.cfg
    cache = KVCache(CacheShape(c.n_layers, batch, c.n_kv_heads, context + 64, c.head_dim), torch.bfloat16)
    tok = torch.zeros(batch, dtype=torch.long)
    pos = torch.full((batch,), context)
    ts = []
    with torch.inference_mode():
        for i in range(reps + 2):
            t0 = time.perf_counter()
            llm.logits(llm(llm.embed(tok)[:, None], pos, cache, kv_len=context + 64)[:, 0])
            if i >= 2:
                ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--family", default="bunny")
    ap.add_argument("--random-dir", default="~/.cache/vlm-caption-pipeline/random")
    ap.add_argument("--model", default=None, help="an existing checkpoint folder instead of a random one")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--context", type=int, default=832)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/compile_probe.json")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    path = a.model or write_random_checkpoint(a.family, Path(a.random_dir).expanduser() / a.family)
    batches = [int(b) for b in a.batches.split(",")]
    res: dict[str, dict[int, float]] = {}
    for mode in ("eager-plain", "eager-packed", "compiled"):
        cpu = torch.device("cpu")
        lm = load_model(path, torch.bfloat16, cpu,
                        kernels=cpu_kernels(cpu, torch.bfloat16) if mode == "eager-packed" else None)
        llm = lm.model.llm
        if mode == "compiled":
            import torch._inductor.config as ic
            ic.freezing = True          # constant-fold weights, let inductor prepack them for oneDNN
            llm.forward = torch.compile(llm.forward, dynamic=False)
            t0 = time.perf_counter()
            step_time(llm, batches[0], a.context, 1)
            log.info("compile + first steps: %.1f s", time.perf_counter() - t0)
        res[mode] = {b: step_time(llm, b, a.context, a.reps) for b in batches}
        log.info("%s: %s", mode, {b: f"{1e3 * t:.1f} ms" for b, t in res[mode].items()})
        del lm, llm
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"family": a.family, "context": a.context, "step_s": res}, indent=2))


if __name__ == "__main__":
    main()
