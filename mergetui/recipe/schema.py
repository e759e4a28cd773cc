"""The recipe data model: a plain, validated description of one merge.

A :class:`Recipe` is built only by :func:`mergetui.recipe.validate.validate_recipe_data`, so code that
holds one may assume it is valid: the method exists, parameters are typed and in range, defaults are
filled in, and model counts fit the method.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.recipe.vocab import (
    DEFAULT_MISSING_TOKENS,
    TokenOverride,
    VocabularySettings,
    model_index,
)

#: The version written by this mergetui. Version 1 recipes (no gradients, filters or slices) are
#: read unchanged and still written as version 1, so older mergetui releases replay them.
RECIPE_VERSION = 2
READABLE_VERSIONS = (1, 2)
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_SHARD_SIZE = 2 * 1000**3
#: ``merge.chat_template`` names (besides ``base`` and ``models[i]``); any other value is a
#: ``.jinja`` file or the template text itself.
CHAT_TEMPLATE_NAMES = ("auto", "chatml", "llama3")
#: mergekit's built-in template names that mergetui does not ship.
MERGEKIT_ONLY_TEMPLATES = ("alpaca", "exaone", "mistral")


def looks_like_template(text: str) -> bool:
    """Jinja text rather than a name: mergekit's rule (at least 20 characters and a ``{``)."""
    return len(text) >= 20 and "{" in text


@dataclass(frozen=True)
class ModelEntry:
    """One ``[[models]]`` entry: a model reference, an optional LoRA adapter and its parameters."""

    model: str
    lora: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SliceSource:
    """One model's layer range in a ``[[slices]]`` entry: layers ``start`` to ``end - 1`` (a
    half-open range, as mergekit's ``layer_range``), with this source's own parameters (only those
    given; the rest come from the slice, the recipe or the method default)."""

    model: str
    layer_range: tuple[int, int]
    lora: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        return self.layer_range[1] - self.layer_range[0]


@dataclass(frozen=True)
class Slice:
    """A run of output layers: taken from one source, or merged from the same-length ranges of
    several. ``base`` overrides the recipe's base for this slice; ``parameters`` are the slice's
    own (between the sources' and the recipe's in precedence)."""

    sources: tuple[SliceSource, ...]
    base: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def layer_count(self) -> int:
        return self.sources[0].layer_count


@dataclass(frozen=True)
class Recipe:
    """A validated merge recipe.

    ``parameters`` holds every global parameter of the method with defaults filled in; each
    ``ModelEntry.parameters`` holds every per-model parameter, defaults filled in.
    ``base_dir`` is the directory relative model paths are resolved against (the recipe's folder).

    A recipe either lists ``models`` (every layer of every model takes part) or ``slices`` (the
    output is made of layer ranges); exactly one of the two is non-empty. Parameter values may be
    scalars, gradients or filtered values (:mod:`mergetui.recipe.params`).
    """

    method: str
    models: tuple[ModelEntry, ...]
    output_path: str
    base: str | None = None
    dtype: str | None = None
    seed: int = 0
    device: str = "auto"
    tokenizer: str = "base"
    chat_template: str | None = None
    missing_tokens: str = DEFAULT_MISSING_TOKENS
    pad_to_multiple_of: int | None = None
    tie_word_embeddings: bool | None = None
    tokens: tuple[TokenOverride, ...] = ()
    parameters: dict[str, Any] = field(default_factory=dict)
    shard_size: int = DEFAULT_SHARD_SIZE
    #: the merge process's memory budget in bytes (RAM, and VRAM on a GPU); None: the default
    max_memory: int | None = None
    version: int = RECIPE_VERSION
    slices: tuple[Slice, ...] = ()
    #: ``[output] lora_rank``: after the merge, extract a LoRA adapter of this rank whose B·A
    #: approximates (merged − base) into :attr:`lora_dir` (None: no extraction)
    lora_rank: int | None = None
    #: ``[output] lora_path``; None: :attr:`lora_dir` is ``<output.path>-lora``
    lora_path: str | None = None
    base_dir: Path = field(default_factory=Path.cwd)
    source_file: str | None = None

    def resolve_path(self, text: str) -> Path:
        """A recipe-relative path made absolute (``~`` expanded)."""
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.base_dir / path)

    @property
    def output_dir(self) -> Path:
        return self.resolve_path(self.output_path)

    @property
    def lora_dir(self) -> Path | None:
        """Where the extracted adapter goes (None without ``lora_rank``): ``lora_path``, else a
        sibling of the output named ``<output>-lora`` — not inside it, because the merged model
        is the extraction's source and an output inside a source is refused."""
        if self.lora_rank is None:
            return None
        if self.lora_path is not None:
            return self.resolve_path(self.lora_path)
        out = self.output_dir
        return out.parent / f"{out.name}-lora"

    def references(self) -> list[str]:
        """Every model reference in the recipe, base first, without duplicates."""
        refs = ([self.base] if self.base else []) + [entry.model for entry in self.models]
        for piece in self.slices:
            refs += ([piece.base] if piece.base else []) + [s.model for s in piece.sources]
        return list(dict.fromkeys(refs))

    @property
    def vocabulary(self) -> VocabularySettings:
        """The vocabulary keys together (:mod:`mergetui.recipe.vocab`)."""
        return VocabularySettings(
            self.tokenizer,
            self.missing_tokens,
            self.pad_to_multiple_of,
            self.tie_word_embeddings,
            self.tokens,
        )

    @property
    def uses_v2(self) -> bool:
        """Whether the recipe needs version 2 (slices, gradients or filters) to be written."""
        from mergetui.recipe.params import is_varying

        values = list(self.parameters.values())
        for entry in self.models:
            values += entry.parameters.values()
        for piece in self.slices:
            values += piece.parameters.values()
            for source in piece.sources:
                values += source.parameters.values()
        chat_v2 = self.chat_template is not None and (
            self.chat_template in ("base", "llama3") or model_index(self.chat_template) is not None
        )
        return (
            bool(self.slices)
            or any(is_varying(v) for v in values)
            or self.vocabulary.needs_v2
            or chat_v2
        )
