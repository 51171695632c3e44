"""Vision stage: ImageInputs -> VisionFeatures (the ready prefill embeddings of each request).

Batches go through the family's encode_images (which batches crops of equal size); the prompt
plan built on the CPU workers is then turned into embeddings with the features spliced in.

Failures (stages/faults.py): an OOM, device or driver error is re-raised, whether it hits the
batch or an image alone — the stream dies, its shards stay uncommitted, the process exits 1 and
a re-run retries them. Any other batch error is logged and the batch retried image by image;
only an image whose error recurs alone becomes an `encode_error` row. Each call runs under the
step watchdog (stages/watchdog.py).
"""

from __future__ import annotations

import logging
import time

import torch

from models.base import LoadedModel
from pipeline.records import Failed
from stages import faults
from stages.records import ImageInputs, VisionFeatures
from stages.watchdog import guard

log = logging.getLogger(__name__)

# Bumped whenever this stage's output can change for the same input: it is part of the run
# fingerprint, so a run dir never mixes rows from before and after such a change.
VERSION = 1


class VisionEncoder:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.seconds = 0.0
        self.streak = faults.FailureStreak("vision encoding")

    def _encode(self, batch: list[ImageInputs]) -> list[VisionFeatures]:
        t0 = time.perf_counter()
        with guard("vision encoding"), torch.inference_mode():
            feats = self.loaded.model.encode_images([b.pixels for b in batch])
            embeds = [self.loaded.model.prompt_embeds(b.plan, f) for b, f in zip(batch, feats)]
        dt = (time.perf_counter() - t0) / len(batch)
        return [VisionFeatures(ref=b.ref, prompt_embeds=e, width=b.width, height=b.height,
                               preprocess_s=b.seconds, encode_s=dt) for b, e in zip(batch, embeds)]

    def __call__(self, batch: list[ImageInputs]) -> list[VisionFeatures | Failed]:
        if not batch:
            return []
        t0 = time.perf_counter()
        try:
            out: list[VisionFeatures | Failed] = list(self._encode(batch))
            self.streak.ok()
        except Exception as e:  # noqa: BLE001 - classified: infrastructure re-raised, else isolated
            if faults.is_infrastructure(e):
                log.error("vision encoding of %d images failed: %s: %s (infrastructure, not the images)",
                          len(batch), type(e).__name__, e)
                raise
            log.warning("vision encoding of %d images failed (%s: %s); retrying them one by one",
                        len(batch), type(e).__name__, e, exc_info=True)
            out = [self._one(b) for b in batch]
        self.seconds += time.perf_counter() - t0
        return out

    def _one(self, item: ImageInputs) -> VisionFeatures | Failed:
        try:
            out = self._encode([item])[0]
        except Exception as e:  # noqa: BLE001 - a per-image failure is a row, not a crash
            if faults.is_infrastructure(e):
                raise
            error = f"{type(e).__name__}: {e}"
            log.warning("vision encoding failed for %s: %s", item.ref.path, error)
            self.streak.failed(error)          # too many in a row: the device, not the images (raises)
            return Failed(item.ref, "encode", "encode_error", error)
        self.streak.ok()
        return out
