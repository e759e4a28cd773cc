"""The recipe being built, shared by every screen (a plain object, not scattered across widgets)."""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergetui.logs import log_dir
from mergetui.recipe.vocab import DEFAULT_MISSING_TOKENS

#: The recipe being built is written here as it changes, and offered back at the next start.
AUTOSAVE_NAME = "draft.json"
PROMPTS_NAME = "prompts.json"
#: the ``[merge]`` keys the wizard edits; any other is kept as it was (``RecipeDraft.merge_extra``)
DRAFT_MERGE_KEYS = (
    "method",
    "base",
    "dtype",
    "seed",
    "device",
    "max_memory",
    "tokenizer",
    "missing_tokens",
    "pad_to_multiple_of",
    "chat_template",
    "parameters",
)


@dataclass
class ModelDraft:
    """One ``[[models]]`` entry. ``weight`` starts at 1 (every weighted method needs one; the
    method step edits it), so a draft can be checked before a method is tuned."""

    model: str
    lora: str = ""
    parameters: dict[str, Any] = field(default_factory=lambda: {"weight": 1.0})


@dataclass
class AdapterDraft:
    """One ``[[adapters.sources]]`` entry of an adapter merge: a PEFT adapter folder and its
    weight (a number once valid; the text as typed until then, for the validator to name)."""

    lora: str
    weight: float | str = 1.0


#: What a draft merges: models (``[merge]`` and ``[[models]]``) or LoRA adapters (``[adapters]``).
MODELS, ADAPTERS = "models", "adapters"
#: The adapter merge's output when the user has not named one (beside the model merge's default).
DEFAULT_ADAPTER_OUTPUT = "./merged-adapter"
DEFAULT_OUTPUT = "./merged"


@dataclass
class RecipeDraft:
    """The recipe being built: what the steps edit, in the shape of the recipe's data.

    Parameter values are kept as recipe data: a number, a list of numbers (a gradient across the
    layers) or a table of filters (per-tensor overrides), so whatever a recipe says survives a
    trip through the wizard. A recipe made of ``[[slices]]`` keeps its slices as they were read
    (``slices``, raw data): the wizard shows them but they are edited in the TOML.
    """

    base: str = ""
    models: list[ModelDraft] = field(default_factory=list)
    method: str = "ties"
    parameters: dict[str, Any] = field(default_factory=dict)
    output: str = DEFAULT_OUTPUT
    dtype: str | None = None
    device: str = "auto"
    #: an int once valid; the text as typed until then, so validation can say what is wrong
    seed: int | str = 0
    #: ``merge.max_memory`` as typed (``"4GiB"``); empty for the default budget
    max_memory: str = ""
    base_dir: Path = field(default_factory=Path.cwd)
    #: ``[[slices]]`` as recipe data (each ``{"sources": [{"model", "layer_range", ...}], ...}``)
    slices: list[dict[str, Any]] = field(default_factory=list)
    #: ``merge.tokenizer``: ``base``, ``union``, ``models[i]`` or (version 1) a model's reference
    tokenizer: str = "base"
    #: ``merge.missing_tokens``: a rule of ``mergetui.recipe.vocab.MISSING_TOKEN_RULES``
    missing_tokens: str = DEFAULT_MISSING_TOKENS
    #: ``merge.pad_to_multiple_of``: None when not set; an int, or the text as typed (like ``seed``)
    pad_to_multiple_of: int | str | None = None
    #: ``merge.chat_template``: None keeps the template of the model the tokenizer comes from
    chat_template: str | None = None
    #: the recipe's other ``[merge]`` keys (``tie_word_embeddings``, ``[merge.tokens]``, …), kept
    #: as given: the wizard does not edit them, but a recipe opened and saved again keeps them
    merge_extra: dict[str, Any] = field(default_factory=dict)
    #: likewise the other ``[output]`` keys (``shard_size``)
    output_extra: dict[str, Any] = field(default_factory=dict)
    #: ``output.lora_rank``: extract a LoRA adapter of (merged − base) of this rank after the
    #: merge; None when not asked for, an int once valid, the text as typed until then
    lora_rank: int | str | None = None
    #: ``output.lora_path``: where that adapter goes ("" for the default, ``<output>-lora``)
    lora_path: str = ""
    #: :data:`MODELS` or :data:`ADAPTERS`: which of the two kinds of recipe the draft is; the
    #: other kind's entries are kept while the user switches back and forth, but not saved
    kind: str = MODELS
    #: an adapter merge's ``[[adapters.sources]]`` (``base`` above is its optional base)
    adapters: list[AdapterDraft] = field(default_factory=list)
    #: ``adapters.combination``: one of :data:`mergetui.recipe.adapters.COMBINATIONS`
    combination: str = "svd"
    #: the other ``[adapters]`` keys as recipe data (density, majority_sign, rank, svd_clamp,
    #: seed, device, …), each a value once it reads as one, else the text as typed
    adapter_options: dict[str, Any] = field(default_factory=dict)

    @property
    def is_adapter_merge(self) -> bool:
        return self.kind == ADAPTERS

    @property
    def uses_v2(self) -> bool:
        """Whether the draft needs recipe version 2: slices, or a gradient or filtered value."""
        values = list(self.parameters.values())
        for entry in self.models:
            values += entry.parameters.values()
        return (
            bool(self.slices)
            or any(isinstance(v, (list, dict)) for v in values)
            or self._vocabulary_recipe().uses_v2
        )

    def _vocabulary_recipe(self) -> Any:
        """The draft's vocabulary and chat template keys on an otherwise empty recipe, so the
        recipe layer's own rule says whether they need version 2 (the values need not be valid)."""
        from mergetui.recipe.schema import Recipe
        from mergetui.recipe.vocab import TokenOverride

        tokens = self.merge_extra.get("tokens")
        tie = self.merge_extra.get("tie_word_embeddings")
        return Recipe(
            method=self.method,
            models=(),
            output_path=self.output,
            tokenizer=self.tokenizer,
            chat_template=self.chat_template,
            missing_tokens=self.missing_tokens,
            pad_to_multiple_of=None if self.pad_to_multiple_of is None else 1,
            tie_word_embeddings=None if tie is None else bool(tie),
            tokens=tuple(TokenOverride(str(t), "zero") for t in tokens or {})
            if isinstance(tokens, dict)
            else (),
        )

    def to_data(self) -> dict[str, Any]:
        """The draft as recipe data (the TOML's structure), for validation and saving."""
        if self.is_adapter_merge:
            return self._adapter_data()
        merge: dict[str, Any] = {"method": self.method, "device": self.device, "seed": self.seed}
        if self.base:
            merge["base"] = self.base
        if self.dtype:
            merge["dtype"] = self.dtype
        if self.max_memory:
            merge["max_memory"] = self.max_memory
        # the vocabulary keys in the recipe layer's order and form (toml_io.recipe_to_data), the
        # defaults left out
        if self.tokenizer != "base":
            merge["tokenizer"] = self.tokenizer
        if self.missing_tokens != DEFAULT_MISSING_TOKENS:
            merge["missing_tokens"] = self.missing_tokens
        if self.pad_to_multiple_of is not None:
            merge["pad_to_multiple_of"] = self.pad_to_multiple_of
        merge.update(copy.deepcopy(self.merge_extra))
        if self.chat_template is not None:
            merge["chat_template"] = self.chat_template
        if self.parameters:
            merge["parameters"] = copy.deepcopy(self.parameters)
        models = []
        for entry in self.models:
            row: dict[str, Any] = {"model": entry.model, **copy.deepcopy(entry.parameters)}
            if entry.lora:
                row["lora"] = entry.lora
            models.append(row)
        data: dict[str, Any] = {"version": 2 if self.uses_v2 else 1, "merge": merge}
        if self.slices:
            data["slices"] = copy.deepcopy(self.slices)
        if models or not self.slices:  # both given: validation says to choose
            data["models"] = models
        output: dict[str, Any] = {"path": self.output, **copy.deepcopy(self.output_extra)}
        if self.lora_rank is not None:
            output["lora_rank"] = self.lora_rank
            if self.lora_path:
                output["lora_path"] = self.lora_path
        data["output"] = output
        return data

    def _adapter_data(self) -> dict[str, Any]:
        """An adapter merge's recipe data, its keys in the recipe layer's order
        (``adapter_recipe_to_data``), any key it does not know kept for the validator to name."""
        from mergetui.recipe.adapters import ADAPTER_KEYS, ADAPTER_RECIPE_VERSION

        options = copy.deepcopy(self.adapter_options)
        table: dict[str, Any] = {"combination": self.combination}
        for key in ADAPTER_KEYS:
            if key in options:
                table[key] = options.pop(key)
        table.update(options)
        if self.base:
            table["base"] = self.base
        table["sources"] = [{"lora": s.lora, "weight": s.weight} for s in self.adapters]
        return {
            "version": ADAPTER_RECIPE_VERSION,
            "adapters": table,
            "output": {"path": self.output},
        }

    @classmethod
    def from_data(cls, data: dict[str, Any], base_dir: Path) -> RecipeDraft:
        """A draft from recipe data that may not validate yet (an autosave of work in progress)."""
        data = copy.deepcopy(data)  # lists and tables in it are the draft's own from now on
        if isinstance(data.get("adapters"), dict):
            return cls._from_adapter_data(data, base_dir)
        merge = data.get("merge", {})
        models = []
        for row in data.get("models", []):
            row = dict(row)
            model, lora = str(row.pop("model", "")), str(row.pop("lora", ""))
            models.append(ModelDraft(model, lora, row))
        slices = data.get("slices", [])
        output = data.get("output", {})
        pad = merge.get("pad_to_multiple_of")
        template = merge.get("chat_template")
        return cls(
            base=str(merge.get("base", "")),
            models=models,
            method=str(merge.get("method", "ties")),
            parameters=dict(merge.get("parameters", {})),
            output=str(output.get("path", "./merged")),
            dtype=merge.get("dtype"),
            device=str(merge.get("device", "auto")),
            seed=merge.get("seed", 0),
            max_memory=str(merge.get("max_memory", "")),
            base_dir=base_dir,
            slices=[dict(s) for s in slices] if isinstance(slices, list) else [],
            tokenizer=str(merge.get("tokenizer", "base")),
            missing_tokens=str(merge.get("missing_tokens", DEFAULT_MISSING_TOKENS)),
            pad_to_multiple_of=pad if pad is None or type(pad) is int else str(pad),
            chat_template=None if template is None else str(template),
            merge_extra={k: v for k, v in merge.items() if k not in DRAFT_MERGE_KEYS},
            output_extra={
                k: v for k, v in output.items() if k not in ("path", "lora_rank", "lora_path")
            },
            lora_rank=output.get("lora_rank"),
            lora_path=str(output.get("lora_path", "")),
        )

    @classmethod
    def _from_adapter_data(cls, data: dict[str, Any], base_dir: Path) -> RecipeDraft:
        table = data["adapters"]
        sources = table.pop("sources", [])
        adapters = [
            AdapterDraft(str(s.get("lora", "")), s.get("weight", 1.0))
            for s in (sources if isinstance(sources, list) else [])
            if isinstance(s, dict)
        ]
        output = data.get("output", {})
        return cls(
            kind=ADAPTERS,
            base=str(table.pop("base", "")),
            combination=str(table.pop("combination", "svd")),
            adapters=adapters,
            adapter_options=table,
            output=str(output.get("path", DEFAULT_ADAPTER_OUTPUT)),
            base_dir=base_dir,
        )

    def slice_lines(self) -> list[str]:
        """Each slice as one line, for the UI: its sources' models and layer ranges (shown
        inclusive, ``0-23``, as the check step's layout shows output layers) and its own
        parameters. The raw data may not be valid yet: odd values are shown as they are."""
        lines = []
        for index, piece in enumerate(self.slices):
            sources = piece.get("sources")
            parts = []
            for source in sources if isinstance(sources, list) else []:
                if not isinstance(source, dict):
                    parts.append(repr(source))
                    continue
                span = source.get("layer_range")
                if (
                    isinstance(span, list)
                    and len(span) == 2
                    and all(isinstance(n, int) and not isinstance(n, bool) for n in span)
                ):
                    last = span[1] - 1
                    layers = f"layer {last}" if last == span[0] else f"layers {span[0]}-{last}"
                else:
                    layers = f"layer_range {span!r}"
                extra = {
                    k: v for k, v in source.items() if k not in ("model", "lora", "layer_range")
                }
                text = f"{source.get('model', '?')} {layers}"
                if source.get("lora"):
                    text += f" + LoRA {source['lora']}"
                if extra:
                    text += " (" + ", ".join(f"{k} = {v}" for k, v in extra.items()) + ")"
                parts.append(text)
            line = f"slices[{index}]: " + (" + ".join(parts) or "no sources")
            if piece.get("base"):
                line += f"; base {piece['base']}"
            params = piece.get("parameters")
            if isinstance(params, dict) and params:
                line += "; " + ", ".join(f"{k} = {v}" for k, v in params.items())
            lines.append(line)
        return lines

    @property
    def is_empty(self) -> bool:
        return not self.base and not self.models and not self.slices and not self.adapters

    def autosave(self) -> None:
        """Write the draft, valid or not, where the next start finds it."""
        path = log_dir() / AUTOSAVE_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        payload = {"base_dir": str(self.base_dir), "recipe": self.to_data()}
        temporary.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
        temporary.replace(path)

    @classmethod
    def load_autosave(cls) -> RecipeDraft | None:
        """The draft autosaved by an earlier session, if there is one worth offering back."""
        path = log_dir() / AUTOSAVE_NAME
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
            draft = cls.from_data(payload["recipe"], Path(payload["base_dir"]))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        return None if draft.is_empty else draft

    @staticmethod
    def discard_autosave() -> None:
        (log_dir() / AUTOSAVE_NAME).unlink(missing_ok=True)

    @classmethod
    def from_recipe(cls, recipe: Any) -> RecipeDraft:
        """A draft holding a loaded recipe (``mergetui open``), paths as the recipe wrote them."""
        from mergetui.recipe.toml_io import recipe_to_data

        return cls.from_data(recipe_to_data(recipe), recipe.base_dir)

    def save(self, path: Path) -> Path:
        """Validate and write the recipe TOML to ``path`` (relative to the draft's folder).

        Saved in the draft's folder, paths stay as typed (relative ones keep working if the folder
        moves); saved anywhere else, local paths are written absolute so the file replays from
        where it lies."""
        from mergetui.recipe import dump_recipe

        target = path if path.is_absolute() else self.base_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        elsewhere = target.parent.resolve() != self.base_dir.resolve()
        dump_recipe(self.to_recipe(), target, absolute_paths=elsewhere)
        return target

    def default_save_path(self) -> str:
        """Next to the output: ``OUTPUT.toml`` beside the output folder."""
        output = self.output.rstrip("/") or "merged"
        return f"{output}.toml"

    def switch_kind(self, kind: str) -> None:
        """Make the draft a model merge or an adapter merge; an output still at one kind's
        default takes the other's, so the adapter does not land in the model's folder name."""
        if kind == self.kind:
            return
        self.kind = kind
        defaults = {MODELS: DEFAULT_OUTPUT, ADAPTERS: DEFAULT_ADAPTER_OUTPUT}
        if self.output in defaults.values():
            self.output = defaults[kind]

    def to_recipe(self) -> Any:
        """Validate the draft into a :class:`~mergetui.recipe.Recipe`, or an
        :class:`~mergetui.recipe.AdapterRecipe` for an adapter merge (raises RecipeError)."""
        if self.is_adapter_merge:
            from mergetui.recipe.adapters import validate_adapter_recipe_data

            return validate_adapter_recipe_data(
                self.to_data(), base_dir=self.base_dir, source_file="(draft)"
            )
        from mergetui.recipe.validate import validate_recipe_data

        return validate_recipe_data(self.to_data(), base_dir=self.base_dir, source_file="(draft)")


#: Offered in the compare step before the user has saved any of their own.
DEFAULT_PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number.",
    "What is 17 * 23? Answer with the number.",
    "Explain in two sentences what merging two fine-tuned models does.",
]


@dataclass
class PromptHistory:
    """Prompts the user has tried, newest first, kept between sessions."""

    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    limit: int = 20

    @classmethod
    def load(cls) -> PromptHistory:
        try:
            saved = json.loads((log_dir() / PROMPTS_NAME).read_text(encoding="utf-8"))
            prompts = [str(p) for p in saved if str(p).strip()]
        except (OSError, ValueError, TypeError):
            return cls()
        return cls(prompts or list(DEFAULT_PROMPTS))

    def remember(self, prompt: str) -> None:
        self.prompts = [prompt, *[p for p in self.prompts if p != prompt]][: self.limit]
        path = log_dir() / PROMPTS_NAME
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.prompts, indent=2), encoding="utf-8")
        except OSError as exc:  # a read-only state folder costs the history, not the comparison
            logging.getLogger("mergetui.tui").warning("cannot save the prompt history: %s", exc)
