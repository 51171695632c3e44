"""Vision stage: ImageInputs -> VisionFeatures (the ready prefill embeddings of each request).

Batches go through the family's encode_images (which batches crops of equal size); the prompt
plan built on the CPU workers is then turned into embeddings with the features spliced in. A
failure of one batch is retried image by image so one bad input cannot fail its neighbours.
"""

from __future__ import annotations

import logging
import time

import torch

from models.base import LoadedModel
from pipeline.records import Failed
from stages.records import ImageInputs, VisionFeatures

log = logging.getLogger(__name__)

# Bumped whenever this stage's output can change for the same input: it is part of the run
# fingerprint, so a run dir never mixes rows from before and after such a change.
VERSION = 1


class VisionEncoder:
    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.seconds = 0.0

    def _encode(self, batch: list[ImageInputs]) -> list[VisionFeatures]:
        t0 = time.perf_counter()
        with torch.inference_mode():
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
        except Exception:  # noqa: BLE001 - isolate the offender: retry one by one
            out = [self._one(b) for b in batch]
        self.seconds += time.perf_counter() - t0
        return out

    def _one(self, item: ImageInputs) -> VisionFeatures | Failed:
        try:
            return self._encode([item])[0]
        except Exception as e:  # noqa: BLE001 - a per-image failure is a row, not a crash
            log.warning("vision encoding failed for %s: %s", item.ref.path, e)
            return Failed(item.ref, "encode", "encode_error", f"{type(e).__name__}: {e}")
