"""Test helpers shared by several test files."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from pipeline.records import ImageRef
from stages.encode import VisionEncoder
from stages.records import ImageInputs


def inputs_for(loaded, root: Path, golden: dict, names: list[str], question: str,
               questions: dict | None = None) -> list[ImageInputs]:
    """Preprocessed golden images (keys = names), optionally with a per-name question."""
    items = []
    for i, name in enumerate(names):
        rel = golden["images"][name]["file"] if "images" in golden else name
        img = Image.open(root / rel).convert("RGB")
        px = loaded.processor(img)
        plan = loaded.prompts.build((questions or {}).get(name, question), px)
        items.append(ImageInputs(ImageRef(name, rel, str(root / rel), 0, i), px, plan, img.size[0], img.size[1], 0.0))
    return items


def features_for(loaded, root: Path, golden: dict, names: list[str], question: str, questions: dict | None = None):
    """VisionFeatures for golden images (keys = names), optionally with a per-name question."""
    return VisionEncoder(loaded)(inputs_for(loaded, root, golden, names, question, questions))
