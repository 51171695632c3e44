"""Prompt presets reproduce the MindIE examples' prompts character for character and token for token."""

from pathlib import Path

import pytest

from models import presets
from models.presets import PRESETS, Preset, get_preset

GOLDEN = Path(__file__).parent / "golden" / "bunny-tiny" / "checkpoint"
QUESTION = "用500字详细描述图片"


class _MindIE:
    """The prompt lines exactly as the MindIE sources write them (bunny.md §9.3, §9.6): backslash
    continuations inside an f-string, so the indentation of the next source line becomes part of
    the string. Written at the same indentation (8 and 12 spaces) to derive the strings the way
    Python does, independently of models.presets."""

    def npu(self, text):
        text_prompt = f"A chat between a curious user and an artificial intelligence assistant. \
        The assistant gives helpful, detailed, and polite answers to the user's questions. \
        USER: <image>\n{text} ASSISTANT:"
        return text_prompt

    def gpu(self, prompt):
        if True:
            text = f"A chat between a curious user and an artificial intelligence assistant. \
            The assistant gives helpful, detailed, and polite answers to the user's questions. \
            USER: <image>\n{prompt} ASSISTANT:"
        return text


def test_required_presets_exist_with_their_questions():
    assert {"mindie-minicpmv2", "mindie-bunny", "mindie-bunny-gpu", "bunny-card"} <= set(PRESETS)
    assert PRESETS["mindie-minicpmv2"] == Preset(
        "mindie-minicpmv2", "minicpmv2", "Write an essay about this image, at least 256 words.", None,
        PRESETS["mindie-minicpmv2"].description)
    assert PRESETS["mindie-bunny"].question == QUESTION
    assert PRESETS["mindie-bunny-gpu"].question == QUESTION
    assert PRESETS["bunny-card"].question == "Describe this image in detail."
    assert PRESETS["bunny-card"].template is None
    for name, p in PRESETS.items():
        assert p.name == name


def test_templates_equal_the_mindie_source_strings():
    npu, gpu = PRESETS["mindie-bunny"].template, PRESETS["mindie-bunny-gpu"].template
    assert npu == _MindIE().npu("{question}")
    assert gpu == _MindIE().gpu("{question}")
    # exact space counts between the three sentences
    assert npu.split("assistant.")[1].split("The")[0] == " " * 9
    assert npu.split("questions.")[1].split("USER")[0] == " " * 9
    assert gpu.split("assistant.")[1].split("The")[0] == " " * 13
    assert gpu.split("questions.")[1].split("USER")[0] == " " * 13
    card_len = 71 + 1 + 82 + 1 + len("USER: <image>\n{question} ASSISTANT:")
    assert len(presets.BUNNY_CARD_TEMPLATE) == card_len == 190
    assert len(npu) == card_len + 2 * 8
    assert len(gpu) == card_len + 2 * 12


def test_card_template_is_the_bunny_default():
    from models.bunny import TEMPLATE
    assert presets.BUNNY_CARD_TEMPLATE == TEMPLATE


def _space_runs(tok, ids):
    """[(text of a whitespace-only run of tokens, text of the token after it)] in order."""
    pieces = [tok.decode([i]) for i in ids]
    runs, i = [], 0
    while i < len(pieces):
        if pieces[i].strip() == "":
            j = i
            while j < len(pieces) and pieces[j].strip() == "":
                j += 1
            runs.append(("".join(pieces[i:j]), pieces[j] if j < len(pieces) else None))
            i = j
        else:
            i += 1
    return runs


@pytest.fixture(scope="module")
def bunny_tiny():
    from models.bunny import BunnyConfig, load_tokenizer
    from models.loading import read_config
    return load_tokenizer(GOLDEN), BunnyConfig.from_dict(read_config(GOLDEN))


@pytest.mark.parametrize("name, gap", [("mindie-bunny", 9), ("mindie-bunny-gpu", 13), ("bunny-card", 1)])
def test_bunny_chunks_have_the_space_run_where_the_spec_says(bunny_tiny, name, gap):
    from models.bunny import TEMPLATE, BunnyPrompts
    tok, cfg = bunny_tiny
    p = get_preset(name, family="bunny")
    chunks = BunnyPrompts(tok, cfg, p.template or TEMPLATE).chunk_ids(p.question)

    derived = {9: _MindIE().npu(QUESTION), 13: _MindIE().gpu(QUESTION),
               1: TEMPLATE.replace("{question}", p.question)}[gap]
    assert chunks == [list(tok(c).input_ids) for c in derived.split("<image>")]

    # bunny.md §6.4: '.', a run of gap-1 spaces (one 8-space token 260 in Qwen's vocab for the NPU
    # prompt, 12 spaces = 1797 for GPU), then the last space attached to ' The' / ' USER'. The tiny
    # vocab has no multi-space tokens, so the run is spelled out, but the split is the same.
    runs = _space_runs(tok, chunks[0])
    if gap == 1:
        assert runs == [(" ", None)]  # only chunk0's trailing ' ' before <image>
    else:
        assert runs[:2] == [(" " * (gap - 1), " The"), (" " * (gap - 1), " USER")]
    assert tok.decode(chunks[0]) + "<image>" + tok.decode(chunks[1]) == derived
    assert tok.decode(chunks[1]).startswith("\n" + p.question)


def test_get_preset_errors():
    with pytest.raises(ValueError, match="unknown prompt preset 'nope'; known: bunny-card"):
        get_preset("nope")
    with pytest.raises(ValueError, match="is for minicpmv2, but the model is bunny"):
        get_preset("mindie-minicpmv2", family="bunny")
    with pytest.raises(ValueError, match="exactly one <image>"):
        Preset("x", "bunny", "q", "no image here {question}")
    with pytest.raises(ValueError, match="unknown family"):
        Preset("x", "llava", "q", None)
