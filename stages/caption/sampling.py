"""Choosing the next token from fp32 logits: greedy (default), or temperature / top-k / top-p
sampling with a repetition penalty, applied in transformers' order (penalty, temperature, top-k,
top-p, then sample).

Each request owns a torch.Generator seeded from (run seed, request key), so a caption does not
depend on which other requests share its batch.
"""

from __future__ import annotations

import hashlib

import torch

from pipeline.config import DecodeConfig


def request_generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    g = torch.Generator(device="cpu")
    g.manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return g


def apply_repetition_penalty(logits: torch.Tensor, history: list[list[int]], penalty: float) -> torch.Tensor:
    """CTRL-style penalty on tokens already generated: divide positive logits, multiply negative."""
    if penalty == 1.0:
        return logits
    logits = logits.clone()
    for row, ids in enumerate(history):
        if not ids:
            continue
        idx = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
        v = logits[row, idx]
        logits[row, idx] = torch.where(v > 0, v / penalty, v * penalty)
    return logits


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [B, V] -> logits with filtered entries set to -inf."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        remove_sorted = cum <= (1 - top_p)
        remove_sorted[:, -1] = False  # always keep the most likely token
        remove = remove_sorted.scatter(1, order, remove_sorted)
        logits = logits.masked_fill(remove, float("-inf"))
    return logits


def choose(logits: torch.Tensor, cfg: DecodeConfig, history: list[list[int]] | None = None,
           generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> next token ids [B] (long, on the logits' device).

    A row whose logits are not finite (NaN/inf: a numeric overflow or a corrupt input) gets id -1
    instead of a meaningless argmax or a sampling error, so it neither passes as a caption nor
    crashes its batch, and it consumes none of its neighbours' random numbers."""
    if cfg.repetition_penalty != 1.0 and history is not None:
        logits = apply_repetition_penalty(logits, history, cfg.repetition_penalty)
    if cfg.greedy:
        best, ids = logits.max(-1)            # one pass, as argmax; NaN propagates into best
        return torch.where(torch.isfinite(best), ids, -1)
    logits = filter_top_k_top_p(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    probs = logits.softmax(-1).cpu()
    # a NaN or +inf logit (or a row of -inf) makes softmax NaN across the whole row: one column tells
    finite = torch.isfinite(probs[:, 0]).tolist()
    bad = torch.tensor([-1])
    out = [torch.multinomial(probs[i], 1, generator=generators[i] if generators else None) if finite[i] else bad
           for i in range(probs.shape[0])]
    return torch.cat(out).to(logits.device)
