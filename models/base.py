"""What every model family provides to the stages: three objects with one job each.

- an image processor (pure CPU, no weights: runs in preprocessing worker processes),
- a prompt builder (tokenizer + the family's template; splices image features into embeddings),
- the nn.Module (vision tower + connector + the shared Decoder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from PIL import Image

from models.decoder import Decoder


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16': the name --dtype, config.json, run.json and the logs use."""
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class PixelInputs:
    """Preprocessed pixels of one image: one or more crops (slices), each [3, H, W] float32."""

    crops: tuple[torch.Tensor, ...]
    grid: tuple[int, int] | None = None      # (cols, rows) of the slices, None when not sliced

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(c.shape[-2:]) for c in self.crops]


class ImageProcessor(Protocol):
    def __call__(self, image: Image.Image) -> PixelInputs: ...


class PromptBuilder(Protocol):
    eos_token_ids: tuple[int, ...]

    def build(self, question: str, pixels: PixelInputs) -> "PromptPlan": ...

    def longest_prompt(self, question: str) -> "PromptPlan":
        """The plan for the largest image the family's processor makes; ValueError when the
        question cannot fit (checked once before a run, so it is not an error on every row)."""
        ...

    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class PromptPlan:
    """Token ids of the prompt, with the positions where image features go.

    ids: [L] text ids (image slots hold a placeholder id); image_spans: (start, end) per image
    feature block, in the order of the features returned by the vision encoder.
    """

    ids: tuple[int, ...]
    image_spans: tuple[tuple[int, int], ...]


class VisionLanguageModel(Protocol):
    llm: Decoder

    def encode_images(self, pixels: list[PixelInputs]) -> list[torch.Tensor]:
        """Per image: the features that replace its image slots, [n_image_tokens, hidden]."""
        ...

    def prompt_embeds(self, plan: PromptPlan, features: torch.Tensor) -> torch.Tensor:
        """[L, hidden] prefill embeddings: text embeddings with the features spliced in."""
        ...


def splice(llm: Decoder, plan: PromptPlan, features: torch.Tensor) -> torch.Tensor:
    """Text embeddings (muP-scaled by the decoder where the family asks) with image features
    (unscaled) written over the image spans. features [sum(span lengths), hidden]."""
    ids = torch.tensor(plan.ids, dtype=torch.long, device=llm.embed_tokens.weight.device)
    emb = llm.embed(ids.clamp_min(0))                                              # [L, hidden]
    if plan.image_spans:
        idx = torch.cat([torch.arange(s, e) for s, e in plan.image_spans]).to(emb.device)
        if idx.numel() != features.shape[0]:
            raise ValueError(f"prompt has {idx.numel()} image slots but the encoder gave {features.shape[0]} features")
        emb = emb.index_copy(0, idx, features.to(emb.dtype))
    return emb


@dataclass
class LoadedModel:
    """A family's three parts plus what the pipeline needs to know about them."""

    family: str
    name: str
    model: VisionLanguageModel               # an nn.Module with llm, encode_images, prompt_embeds
    processor: ImageProcessor
    prompts: PromptBuilder
    dtype: torch.dtype
    device: torch.device
    max_context: int
    kernels: str = "torch"                   # the CPU fast paths in use (set by registry.load_model)
