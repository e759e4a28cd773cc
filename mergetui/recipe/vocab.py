"""The recipe's vocabulary settings: which tokenizer the output gets, how rows are aligned.

``[merge]`` keys (recipe version 2 except ``tokenizer = "base"`` or a model, which version 1 has):

- ``tokenizer``: ``"base"`` (the base's vocabulary; the v1 meaning), ``"union"`` (every token of
  every model), ``"models[i]"`` (that model's), or, as in version 1, a model's reference;
- ``missing_tokens``: what a model that lacks an output token contributes for it (``borrow``,
  mergekit's rule, ``base_mean`` or ``zero``; see :data:`MISSING_TOKEN_RULES`);
- ``pad_to_multiple_of``: round the output's embedding rows up (and ``vocab_size`` with them);
- ``tie_word_embeddings``: whether the output's head shares the embedding (default: as the model
  the config comes from);
- ``[merge.tokens]``: per-token overrides, mergekit's ``tokenizer.tokens``.

Only the recipe's own consistency is checked here (names, types, model references); whether a
token exists in a model's vocabulary is checked by the plan, from the tokenizer files, before any
weight is read.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TOKENIZER_CHOICES = ("base", "union")
#: ``missing_tokens`` values and what each gives a model that lacks a token.
MISSING_TOKEN_RULES = {
    "borrow": (
        "mergekit's rule: the row of the one model that has the token; the base's row when the "
        "base has it; else the mean of the rows of the models that have it"
    ),
    "base_mean": "the mean of all the base's token rows (a neutral start for a new token)",
    "zero": "a row of zeros",
}
DEFAULT_MISSING_TOKENS = "borrow"
TOKEN_KEYS = ("source", "token", "token_id", "force")
_MODEL_ROLE = re.compile(r"^models\[(\d+)\]$")


@dataclass(frozen=True)
class TokenOverride:
    """One ``[merge.tokens]`` entry: where ``token``'s row comes from.

    ``source`` is ``"zero"``, ``"base"``, ``"models[i]"`` or a model reference. The row is that
    model's row for ``token`` itself, or for ``from_token`` / row ``from_id`` when given. Models
    that lack ``token`` take this row; with ``force`` every model does (so most methods output it
    unchanged).
    """

    token: str
    source: str
    from_token: str | None = None
    from_id: int | None = None
    force: bool = False

    def data(self) -> str | dict[str, Any]:
        """The TOML value: the short form (just the source) when nothing else is set."""
        if self.from_token is None and self.from_id is None and not self.force:
            return self.source
        value: dict[str, Any] = {"source": self.source}
        if self.from_token is not None:
            value["token"] = self.from_token
        if self.from_id is not None:
            value["token_id"] = self.from_id
        if self.force:
            value["force"] = True
        return value


def model_index(text: str) -> int | None:
    """``models[i]`` → i, else None."""
    found = _MODEL_ROLE.match(text)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class VocabularySettings:
    tokenizer: str = "base"
    missing_tokens: str = DEFAULT_MISSING_TOKENS
    pad_to_multiple_of: int | None = None
    tie_word_embeddings: bool | None = None
    tokens: tuple[TokenOverride, ...] = ()

    @property
    def needs_v2(self) -> bool:
        """Anything a version 1 recipe cannot say."""
        return (
            self.tokenizer == "union"
            or model_index(self.tokenizer) is not None
            or self.missing_tokens != DEFAULT_MISSING_TOKENS
            or self.pad_to_multiple_of is not None
            or self.tie_word_embeddings is not None
            or bool(self.tokens)
        )


def _model_reference(
    text: str,
    where: str,
    models: list[str],
    slice_models: list[str],
    add: Callable[[str], None],
    keywords: tuple[str, ...] = ("base",),
) -> bool:
    """Whether ``text`` names a model of the recipe (``keywords`` are checked by the caller and
    only feed the "did you mean")."""
    index = model_index(text)
    if index is not None:
        if slice_models and not models:
            add(
                f"{where}: {text!r}: a recipe of [[slices]] has no [[models]]; name the model "
                "by its `model` value instead"
            )
            return False
        if index >= len(models):
            last = f"models[0] to models[{len(models) - 1}]" if models else "no models"
            add(f"{where}: {text!r} does not exist; this recipe has {last}")
            return False
        return True
    if text in models or text in slice_models:
        return True
    from mergetui.recipe.validate import did_you_mean

    choices = [*keywords, *[f"models[{i}]" for i in range(len(models))], *models, *slice_models]
    named = ", ".join(f'"{k}"' for k in keywords)
    add(
        f"{where}: {text!r} is neither {named} nor a model of this recipe"
        f'{did_you_mean(text, choices)}; use {named}, "models[i]" or a model\'s `model` value'
    )
    return False


def validate_vocabulary(
    merge: dict[str, Any],
    *,
    models: list[str],
    slice_models: list[str],
    has_base: bool,
    add: Callable[[str], None],
) -> VocabularySettings:
    """The ``[merge]`` vocabulary keys, every problem passed to ``add``."""
    tokenizer = merge.get("tokenizer", "base")
    if not isinstance(tokenizer, str) or not tokenizer.strip():
        add(f'merge.tokenizer: must be "base", "union" or "models[i]", not {tokenizer!r}')
        tokenizer = "base"
    tokenizer = tokenizer.strip()
    if tokenizer not in TOKENIZER_CHOICES and not _model_reference(
        tokenizer, "merge.tokenizer", models, slice_models, add, TOKENIZER_CHOICES
    ):
        tokenizer = "base"

    missing = merge.get("missing_tokens", DEFAULT_MISSING_TOKENS)
    if missing not in MISSING_TOKEN_RULES:
        from mergetui.recipe.validate import did_you_mean

        add(
            f"merge.missing_tokens: {missing!r} is not a rule"
            f"{did_you_mean(str(missing), list(MISSING_TOKEN_RULES))}; use one of "
            f"{', '.join(MISSING_TOKEN_RULES)}"
        )
        missing = DEFAULT_MISSING_TOKENS
    if missing == "base_mean" and not has_base:
        add(
            'merge.missing_tokens: "base_mean" needs a base model (merge.base); set one, or use '
            '"borrow" or "zero"'
        )

    pad = merge.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        add(f"merge.pad_to_multiple_of: must be a whole number >= 1 (e.g. 64), not {pad!r}")
        pad = None

    tie = merge.get("tie_word_embeddings")
    if tie is not None and not isinstance(tie, bool):
        add(f"merge.tie_word_embeddings: must be true or false, not {tie!r}")
        tie = None

    tokens = _token_overrides(merge.get("tokens"), models, slice_models, has_base, add)
    return VocabularySettings(tokenizer, missing, pad, tie, tokens)


def _token_overrides(
    raw: Any,
    models: list[str],
    slice_models: list[str],
    has_base: bool,
    add: Callable[[str], None],
) -> tuple[TokenOverride, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        add(
            '[merge.tokens]: must be a table of token = source, e.g. "<|im_end|>" = "models[1]"; '
            f"not {type(raw).__name__}"
        )
        return ()
    overrides = []
    for token, value in raw.items():
        where = f"merge.tokens.{token!r}"
        if not token:
            add(f"{where}: a token cannot be empty")
            continue
        entry = {"source": value} if isinstance(value, str) else value
        if not isinstance(entry, dict):
            add(f'{where}: give a source ("models[1]", "base" or "zero") or a table, not {value!r}')
            continue
        unknown = [k for k in entry if k not in TOKEN_KEYS]
        if unknown:
            from mergetui.recipe.validate import did_you_mean

            add(
                f"{where}.{unknown[0]}: unknown key{did_you_mean(unknown[0], TOKEN_KEYS)}; "
                f"allowed here: {', '.join(TOKEN_KEYS)}"
            )
            continue
        source = entry.get("source")
        if not isinstance(source, str) or not source:
            add(
                f'{where}.source: missing; say where the row comes from: "models[i]", "base" or "zero"'
            )
            continue
        from_token, from_id = entry.get("token"), entry.get("token_id")
        force = entry.get("force", False)
        ok = True
        if source == "base":
            if not has_base:
                add(f'{where}.source: "base" but the recipe has no merge.base')
                ok = False
        elif source != "zero":
            ok = _model_reference(
                source, f"{where}.source", models, slice_models, add, ("base", "zero")
            )
        if source == "zero" and (from_token is not None or from_id is not None):
            add(f'{where}: source "zero" takes no token or token_id; remove them')
            ok = False
        if from_token is not None and from_id is not None:
            add(f"{where}: give token or token_id, not both")
            ok = False
        if from_token is not None and (not isinstance(from_token, str) or not from_token):
            add(f"{where}.token: must be a token string, not {from_token!r}")
            ok = False
        if from_id is not None and (
            isinstance(from_id, bool) or not isinstance(from_id, int) or from_id < 0
        ):
            add(f"{where}.token_id: must be a row number >= 0, not {from_id!r}")
            ok = False
        if not isinstance(force, bool):
            add(f"{where}.force: must be true or false, not {force!r}")
            ok = False
        if ok:
            overrides.append(TokenOverride(token, source, from_token, from_id, force))
    return tuple(overrides)


def vocabulary_data(settings: VocabularySettings) -> dict[str, Any]:
    """The ``[merge]`` keys to write (only those that differ from the defaults, bar tokenizer)."""
    data: dict[str, Any] = {}
    if settings.missing_tokens != DEFAULT_MISSING_TOKENS:
        data["missing_tokens"] = settings.missing_tokens
    if settings.pad_to_multiple_of is not None:
        data["pad_to_multiple_of"] = settings.pad_to_multiple_of
    if settings.tie_word_embeddings is not None:
        data["tie_word_embeddings"] = settings.tie_word_embeddings
    if settings.tokens:
        data["tokens"] = {o.token: o.data() for o in settings.tokens}
    return data
