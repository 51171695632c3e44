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


# -- the `caption` job -----------------------------------------------------------------------------

DEFAULT_PROMPT = "Describe this image in detail."
DEFAULT_SHARD_SIZE = 256
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000     # 10^8: a 10k x 10k photo; larger is refused as too_large
DEFAULT_MAX_ASPECT_RATIO = 50.0            # 1 x 20000 strips etc. are refused (padding them to a square explodes)
DEFAULT_MAX_IMAGE_SECONDS = 60.0           # a 10^8-pixel photo preprocesses in a few seconds on one loaded core


@dataclass(frozen=True)
class ImageLimits:
    """Caps on one untrusted image: size and shape before any pixel is decoded (memory), and the
    wall time its preprocessing may take (a pathological file must not hold a worker)."""

    max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO
    max_seconds: float = DEFAULT_MAX_IMAGE_SECONDS


@dataclass(frozen=True)
class ArraySlice:
    """This process's part of the manifest in an array job: shards with index % total == index."""

    index: int = 0
    total: int = 1

    def owns(self, shard: int) -> bool:
        return shard % self.total == self.index


@dataclass(frozen=True)
class RunConfig:
    """Everything `pipeline caption` was asked to do, after job file + flags + defaults are merged."""

    manifest: str
    model: str
    out: str
    prompt: str | None = None               # None: the preset's question, else DEFAULT_PROMPT
    prompt_preset: str | None = None
    decode: DecodeConfig = DecodeConfig()
    dtype: str = "auto"
    device: str = "auto"
    max_batch_size: int | None = None       # engine slots; None = from the memory budget
    memory_budget_gib: float | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    retry_failed: bool = False
    array: ArraySlice = ArraySlice()
    engine: str = "local"                   # "local" | "ray" (pipeline/distribute.py)
    ray_address: str | None = None          # None: start a local Ray instance (or reuse this process's)
    ray_actors: int | None = None           # model actors; None = as many as the cluster can hold
    threads: int | None = None
    quiet: bool = False
    workers: int | None = None              # preprocessing processes; None = from the core count, 0 = inline
    limits: ImageLimits = ImageLimits()
    config_file: str | None = None          # the TOML job file the options came from, for the record
