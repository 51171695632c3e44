"""The records between the model stages, which carry tensors (the plain ones are in pipeline/records.py).

ImageInputs    preprocess -> encode
VisionFeatures encode     -> caption
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.base import PixelInputs, PromptPlan
from pipeline.records import ImageRef


@dataclass(frozen=True)
class ImageInputs:
    ref: ImageRef
    pixels: PixelInputs
    plan: PromptPlan               # prompt ids with the image spans (tokenized on the CPU workers)
    width: int
    height: int
    seconds: float                 # time spent opening + preprocessing


@dataclass(frozen=True)
class VisionFeatures:
    ref: ImageRef
    prompt_embeds: torch.Tensor    # [L, hidden] prefill embeddings (text + spliced image features)
    width: int
    height: int
    preprocess_s: float
    encode_s: float
