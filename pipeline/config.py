"""Frozen configuration records. Everything a run depends on is here, so it can be fingerprinted."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeConfig:
    """How new tokens are chosen. Greedy (temperature 0) is the default and the parity mode."""

    max_new_tokens: int = 256
    temperature: float = 0.0        # 0 -> greedy argmax
    top_p: float = 1.0
    top_k: int = 0                  # 0 -> no top-k filter
    repetition_penalty: float = 1.0
    seed: int = 0
    ignore_eos: bool = False        # always emit max_new_tokens (benchmarks)

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0
