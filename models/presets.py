"""Prompt presets: the exact question + template pairs of the Huawei MindIE examples' precision runs.

A preset lets `pipeline caption --prompt-preset NAME` reproduce the captions the examples judge
with CLIP (docs: shared/docs/bunny.md §9.3/§9.6, minicpmv2.md §7.3). Templates use the same
placeholders as models.bunny.TEMPLATE: `{question}` and one `<image>`; None means the family's
own default template. Decoding in those runs is greedy with 256 new tokens, which is already the
`caption` default, so a preset carries only the prompt.

This module is plain data (no torch import) so the CLI can list presets cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILIES = ("bunny", "minicpmv2")

_SYSTEM_1 = "A chat between a curious user and an artificial intelligence assistant."
_SYSTEM_2 = "The assistant gives helpful, detailed, and polite answers to the user's questions."
_TURN = "USER: <image>\n{question} ASSISTANT:"


def _bunny_template(gap: int) -> str:
    """conv_bunny with `gap` spaces between the three sentences.

    MindIE builds its prompt with backslash line continuations inside an f-string; the source
    indentation ends up in the string. NPU (run_pa.py / flash_causal_bunny.py): one space before
    the backslash + 8 indentation spaces = 9. GPU (precision/run_coco_gpu.py): 1 + 12 = 13. The
    model card has 1. Different gaps give different token ids, hence different captions.
    """
    sep = " " * gap
    return _SYSTEM_1 + sep + _SYSTEM_2 + sep + _TURN


BUNNY_CARD_TEMPLATE = _bunny_template(1)
BUNNY_MINDIE_NPU_TEMPLATE = _bunny_template(9)
BUNNY_MINDIE_GPU_TEMPLATE = _bunny_template(13)

MINDIE_MINICPMV2_QUESTION = "Write an essay about this image, at least 256 words."
MINDIE_BUNNY_QUESTION = "用500字详细描述图片"  # "describe the picture in detail in 500 characters"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str                 # "bunny" | "minicpmv2": the model family the template is written for
    question: str
    template: str | None        # None = the family's default template
    description: str = ""

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"preset {self.name!r}: unknown family {self.family!r} (use one of {FAMILIES})")
        if self.template is not None and (self.template.count("<image>") != 1 or "{question}" not in self.template):
            raise ValueError(f"preset {self.name!r}: a template needs exactly one <image> and a {{question}}")


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("mindie-minicpmv2", "minicpmv2", MINDIE_MINICPMV2_QUESTION, None,
           "MindIE minicpmv2 NPU precision run (default --input_texts_for_image; model's own chat prompt)"),
    Preset("mindie-bunny", "bunny", MINDIE_BUNNY_QUESTION, BUNNY_MINDIE_NPU_TEMPLATE,
           "MindIE Bunny NPU precision run (run_pa.py; 9 spaces between the system sentences)"),
    Preset("mindie-bunny-gpu", "bunny", MINDIE_BUNNY_QUESTION, BUNNY_MINDIE_GPU_TEMPLATE,
           "MindIE Bunny GPU reference (precision/run_coco_gpu.py; 13 spaces between the system sentences)"),
    Preset("bunny-card", "bunny", "Describe this image in detail.", None,
           "Bunny model-card template with a captioning question"),
)}


def get_preset(name: str, family: str | None = None) -> Preset:
    """The preset called `name`; with `family`, also check it fits the loaded model."""
    try:
        preset = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown prompt preset {name!r}; known: {', '.join(sorted(PRESETS))}") from None
    if family is not None and preset.family != family:
        raise ValueError(f"prompt preset {name!r} is for {preset.family}, but the model is {family}")
    return preset
