"""A model's vocabulary, read from its tokenizer files (small; no weight is read).

``tokenizer.json`` is read with the ``tokenizers`` library (fast, no transformers import). A model
that ships only slow-tokenizer files (``tokenizer.model``, ``vocab.txt``...) is read through
``transformers.AutoTokenizer``, which converts it. The result says, for each token string, the row
of the embedding it indexes, which tokens were added (with their flags, so a union tokenizer keeps
them special or not), the named special tokens and whether the model has a chat template.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.errors import SourceError

#: Files that make a tokenizer; any one of them means the model has one.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
)
_SLOW_ONLY = ("tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


@dataclass(frozen=True)
class AddedToken:
    """An added token and its flags (as ``tokenizers.AddedToken`` has them)."""

    content: str
    special: bool = False
    single_word: bool = False
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = True


@dataclass
class Vocabulary:
    """One model's tokens: ``ids`` maps every token string to its id (regular and added)."""

    label: str
    ids: dict[str, int]
    added: dict[int, AddedToken] = field(default_factory=dict)
    special: dict[str, str] = field(default_factory=dict)
    has_chat_template: bool = False
    read_from: str = "tokenizer.json"

    def __len__(self) -> int:
        return len(self.ids)

    def within(self, rows: int) -> dict[str, int]:
        """The tokens whose id has a row in an embedding of ``rows`` rows."""
        return {token: index for token, index in self.ids.items() if index < rows}

    @property
    def special_tokens(self) -> list[str]:
        """Named special tokens and added tokens marked special, in id order."""
        named = list(self.special.values())
        flagged = [info.content for _, info in sorted(self.added.items()) if info.special]
        return list(dict.fromkeys(named + flagged))


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def read_vocabulary(directory: Path, label: str) -> Vocabulary | None:
    """The vocabulary of the model in ``directory``; None when it has no tokenizer files.

    Raises :class:`SourceError` (naming the file) when the files exist but cannot be read.
    """
    if not has_tokenizer(directory):
        return None
    fast = directory / "tokenizer.json"
    if fast.is_file():
        vocabulary = _read_fast(fast, label)
    elif any((directory / name).is_file() for name in _SLOW_ONLY):
        vocabulary = _read_with_transformers(directory, label)
    else:
        raise SourceError(
            f"{label}: {directory} has tokenizer settings but no vocabulary (no tokenizer.json, "
            "tokenizer.model or vocab file); copy the tokenizer files of the model it was "
            "fine-tuned from"
        )
    vocabulary.special = {**_special_tokens(directory, label), **vocabulary.special}
    vocabulary.has_chat_template = _has_template(directory)
    return vocabulary


def _read_fast(path: Path, label: str) -> Vocabulary:
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust library raises its own exception types
        raise SourceError(
            f"{label}: cannot read {path}: {exc}; the file is damaged or from a newer tokenizers "
            "release; re-save the tokenizer (AutoTokenizer.from_pretrained(...).save_pretrained)"
        ) from exc
    added = {
        index: AddedToken(
            token.content,
            token.special,
            token.single_word,
            token.lstrip,
            token.rstrip,
            token.normalized,
        )
        for index, token in tokenizer.get_added_tokens_decoder().items()
    }
    return Vocabulary(label, tokenizer.get_vocab(with_added_tokens=True), added)


def _read_with_transformers(directory: Path, label: str) -> Vocabulary:
    """Slow-tokenizer files: transformers converts them (it needs sentencepiece for some)."""
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(directory))
    except Exception as exc:  # transformers raises many types for unreadable tokenizers
        raise SourceError(
            f"{label}: cannot load the tokenizer in {directory}: {exc}; install what it asks "
            "for (e.g. sentencepiece), or add a tokenizer.json"
        ) from exc
    added = {
        index: AddedToken(
            token.content,
            bool(getattr(token, "special", False)),
            bool(getattr(token, "single_word", False)),
            bool(getattr(token, "lstrip", False)),
            bool(getattr(token, "rstrip", False)),
            bool(getattr(token, "normalized", True)),
        )
        for index, token in tokenizer.added_tokens_decoder.items()
    }
    special = {
        name: str(value)
        for name, value in tokenizer.special_tokens_map.items()
        if name in SPECIAL_NAMES and isinstance(value, str)
    }
    return Vocabulary(label, dict(tokenizer.get_vocab()), added, special, read_from="transformers")


def _json(path: Path, label: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SourceError(f"{label}: cannot read {path}: {exc}; fix or remove the file") from exc
    return data if isinstance(data, dict) else {}


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _special_tokens(directory: Path, label: str) -> dict[str, str]:
    """bos/eos/unk/pad as tokenizer_config.json names them, special_tokens_map.json winning (as
    transformers reads them)."""
    found: dict[str, str] = {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        data = _json(directory / name, label)
        for key in SPECIAL_NAMES:
            text = _token_text(data.get(key))
            if text:
                found[key] = text
    return found


def _has_template(directory: Path) -> bool:
    from mergetui.sources.chat_template import template_of

    return template_of(directory) is not None
