"""The slow SentencePiece LlamaTokenizer behaviour MiniCPM-V-2 was trained and evaluated with.

Spec: ../shared/docs/minicpmv2.md §6.1. The reference uses transformers 4.36's slow
`LlamaTokenizer` with `legacy=True`; transformers 5's LlamaTokenizer is a different (fast) code
path, so the semantics are implemented here directly on the `sentencepiece` library:

encode: split the text on the added tokens of tokenizer_config.json (leftmost, longest match),
        keep those as their ids, encode every other chunk ON ITS OWN with sentencepiece (so each
        chunk gets the model's dummy-prefix "▁"), prepend BOS when add_bos_token.
decode: ids -> pieces (added tokens by content); the first piece loses one leading "▁"; runs of
        ordinary pieces go through sp.decode, special tokens are kept literally, and in legacy
        mode a " " is inserted before a special token that follows ordinary text (not at i=0).

Only the tokenizer.model protobuf and two JSON files are read (no code from the checkpoint).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece as spm

log = logging.getLogger(__name__)

SPIECE_UNDERLINE = "\u2581"


def _content(tok, where: str) -> str | None:
    """A special token entry of the JSON files: a string or an AddedToken-like dict."""
    from models.loading import CheckpointError

    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict) and isinstance(tok.get("content"), str):
        return tok["content"]
    raise CheckpointError(f"{where} must be a string or an object with a content string, got {str(tok)[:60]}")


# AddedToken flags the slow Llama tokenizer acts on when true (transformers 4.36 tokenize():
# strip the neighbouring text's whitespace, or match only whole words). This loader implements
# them all false, as every MiniCPM-V-2 token has them, and refuses a checkpoint that sets one.
# `normalized` and `special` are accepted either way: the slow Llama tokenizer only reads them
# when lower-casing (do_lower_case), which it never does.
_UNIMPLEMENTED_FLAGS = ("lstrip", "rstrip", "single_word")
_ACCEPTED_FLAGS = ("normalized", "special")


def _added_tokens(entries, where: str) -> dict[int, str]:
    """tokenizer_config.json's added_tokens_decoder -> {id: content}, every entry checked."""
    from models.loading import CheckpointError

    if not isinstance(entries, dict):
        raise CheckpointError(f"{where}: added_tokens_decoder must be an object {{id: token}}")
    out: dict[int, str] = {}
    for key, tok in entries.items():
        name = f"{where}: added token {str(key)[:20]}"
        if not str(key).isdigit() or int(key) >= 1 << 24:
            raise CheckpointError(f"{name}: the id must be a non-negative integer")
        if not isinstance(tok, dict) or not isinstance(tok.get("content"), str) or not tok["content"]:
            raise CheckpointError(f"{name} must be an object with a non-empty content string, got {str(tok)[:60]}")
        for flag in (*_UNIMPLEMENTED_FLAGS, *_ACCEPTED_FLAGS):
            if not isinstance(tok.get(flag, False), bool):
                raise CheckpointError(f"{name} ({tok['content'][:40]!r}): {flag} must be true or false")
        on = [flag for flag in _UNIMPLEMENTED_FLAGS if tok.get(flag, False)]
        if on:
            raise CheckpointError(f"{name} ({tok['content'][:40]!r}) has {on[0]} true, which this tokenizer does "
                                  "not implement (only the slow Llama tokenizer's all-false flags are)")
        if tok["content"] in out.values():
            raise CheckpointError(f"{name}: content {tok['content'][:40]!r} is also another added token's")
        out[int(key)] = tok["content"]
    return out


@dataclass(frozen=True)
class DecodeResult:
    text: str
    n_unknown: int            # ids outside the tokenizer's vocabulary (mapped to "")


class SlowLlamaTokenizer:
    def __init__(self, model_dir: str | Path):
        from models.config_schema import Fields
        from models.loading import CheckpointError  # local imports keep this module light

        model_dir = Path(model_dir)
        vocab = model_dir / "tokenizer.model"
        if not vocab.is_file():
            raise CheckpointError(f"{model_dir}: no tokenizer.model (SentencePiece) file")
        cfg = self._read_json(model_dir / "tokenizer_config.json")
        smap = self._read_json(model_dir / "special_tokens_map.json")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(vocab))
        except (OSError, RuntimeError) as e:
            raise CheckpointError(f"{vocab}: not a SentencePiece model ({e})") from e
        self.sp_size = self.sp.get_piece_size()
        where = str(model_dir / "tokenizer_config.json")
        # Settings are read as the values this implementation has (Fields refuses other types);
        # the ones it cannot honour are refused by name, as `legacy: false` always was.
        f = Fields(cfg, source=where)
        self.legacy = f.boolean("legacy", True)
        f.require(self.legacy, "only the legacy slow Llama tokenizer (legacy: true) is supported")
        f.require(not f.boolean("spaces_between_special_tokens", False),
                  "spaces_between_special_tokens true is not implemented (MiniCPM-V-2 decodes without them)")
        kwargs = cfg.get("sp_model_kwargs")
        f.require(not kwargs, f"sp_model_kwargs {str(kwargs)[:60]} is not implemented (sampling or other "
                              "SentencePiece options would change the ids)")
        self.add_bos = f.boolean("add_bos_token", True)
        self.add_eos = f.boolean("add_eos_token", False)
        self.clean_up_spaces = f.boolean("clean_up_tokenization_spaces", False)

        # Added tokens: id -> content (and back); these are never split nor sent to sentencepiece.
        self.added: dict[int, str] = _added_tokens(cfg.get("added_tokens_decoder", {}), where)
        self.added_ids: dict[str, int] = {c: i for i, c in self.added.items()}

        def special(key: str, default: str | None) -> str | None:
            return _content(smap.get(key, cfg.get(key, default)), f"{model_dir}: {key}")

        self.bos_token, self.eos_token = special("bos_token", "<s>"), special("eos_token", "</s>")
        self.unk_token, self.pad_token = special("unk_token", "<unk>"), special("pad_token", None)
        extra = smap.get("additional_special_tokens", cfg.get("additional_special_tokens", []))
        if not isinstance(extra, list):
            raise CheckpointError(f"{model_dir}: additional_special_tokens must be a list")
        extra = [_content(t, f"{model_dir}: additional_special_tokens") for t in extra]
        # transformers' all_special_tokens: the named special tokens plus additional_special_tokens.
        self.all_special = {t for t in (self.bos_token, self.eos_token, self.unk_token, self.pad_token, *extra) if t}
        self.bos_id, self.eos_id = self.token_to_id(self.bos_token), self.token_to_id(self.eos_token)
        # Added tokens that are not special, or special ones beyond the sp vocabulary, are decoded
        # as standalone strings (transformers' "legacy_added_tokens").
        self._standalone = {c for c in self.added_ids if c not in self.all_special} | {
            t for t in extra if t in self.added_ids and self.added_ids[t] >= self.sp_size}
        # Longest first so that the regex alternation finds the longest match at each position.
        alts = sorted(self.added_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(a) for a in alts) + ")") if alts else None

    @staticmethod
    def _read_json(path: Path) -> dict:
        from models.loading import read_json_object

        return read_json_object(path) if path.is_file() else {}

    # -- vocabulary -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce or name (sp pieces and added tokens)."""
        return max([self.sp_size - 1, *self.added]) + 1

    def token_to_id(self, token: str) -> int:
        if token in self.added_ids:
            return self.added_ids[token]
        return self.sp.piece_to_id(token)

    # -- encode ---------------------------------------------------------------------------------
    def split(self, text: str) -> list[str]:
        """Text -> chunks, each either an added token or plain text (empty chunks dropped)."""
        parts = self._split_re.split(text) if self._split_re else [text]
        return [p for p in parts if p]

    def encode(self, text: str) -> list[int]:
        ids: list[int] = [self.bos_id] if self.add_bos else []
        for chunk in self.split(text):
            if chunk in self.added_ids:
                ids.append(self.added_ids[chunk])
            else:
                # pieces -> ids with added tokens taking precedence, as the slow tokenizer does
                ids.extend(self.token_to_id(p) for p in self.sp.encode(chunk, out_type=str))
        if self.add_eos:
            ids.append(self.eos_id)
        return ids

    # -- decode ---------------------------------------------------------------------------------
    def _pieces_to_string(self, tokens: list[str]) -> str:
        if tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = [tokens[0][1:], *tokens[1:]]
        out, run, prev_special = "", [], False
        for i, tok in enumerate(tokens):
            if tok in self.all_special:
                if not prev_special and i != 0 and self.legacy:
                    out += " "
                out += self.sp.decode(run) + tok
                run, prev_special = [], True
            else:
                run.append(tok)
                prev_special = False
        return out + self.sp.decode(run)

    def decode(self, ids: list[int]) -> DecodeResult:
        """skip_special_tokens=False, spaces_between_special_tokens=False decode of `ids`."""
        tokens: list[str] = []
        unknown = 0
        for i in ids:
            i = int(i)
            if i in self.added:
                tokens.append(self.added[i])
            elif 0 <= i < self.sp_size:
                tokens.append(self.sp.id_to_piece(i))
            else:
                unknown += 1      # e.g. a random full-size lm_head (122753 rows) over the tiny tokenizer
        parts, run = [], []
        for t in tokens:
            if t in self._standalone:
                if run:
                    s = self._pieces_to_string(run)
                    if s:
                        parts.append(s)
                    run = []
                parts.append(t)
            else:
                run.append(t)
        if run:
            parts.append(self._pieces_to_string(run))
        text = "".join(parts)
        if self.clean_up_spaces:
            text = clean_up_tokenization(text)
        if unknown:
            log.debug("decode: %d ids outside the vocabulary (size %d) mapped to ''", unknown, self.vocab_size)
        return DecodeResult(text, unknown)


def clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization (only used when the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text
