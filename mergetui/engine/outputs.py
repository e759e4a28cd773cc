"""Everything in the output folder besides the weights: config, tokenizer, model card, recipe."""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mergetui import __version__
from mergetui.engine.chat_templates import write_chat_template
from mergetui.errors import MergeFailed
from mergetui.pauses import pause_point
from mergetui.recipe.toml_io import recipe_to_toml
from mergetui.sources.vocabulary import TOKENIZER_FILES

if TYPE_CHECKING:
    from mergetui.engine.plan import MergePlan
    from mergetui.engine.vocabulary import VocabularyPlan

#: Files copied from the model chosen by ``merge.tokenizer`` when present.
SUPPORT_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)
RECIPE_FILE = "mergetui.toml"


def write_tokenizer(vocabulary: VocabularyPlan, source_dir: Path, directory: Path) -> list[Path]:
    """The output tokenizer when it gains tokens: the source's, loaded with transformers, the new
    tokens added in the planned order (flags kept), saved. Every token must land on the id its row
    was aligned to; anything else would scramble the model, so it is an error, not a warning."""
    from tokenizers import AddedToken as Token
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
    new: list[str | Token] = [
        token
        if info is None
        else Token(
            info.content,
            single_word=info.single_word,
            lstrip=info.lstrip,
            rstrip=info.rstrip,
            normalized=info.normalized,
            special=info.special,
        )
        for token, info in vocabulary.new_tokens
    ]
    tokenizer.add_tokens(new)
    ids = tokenizer.get_vocab()
    wrong = [
        (token, index, ids.get(token))
        for index, token in enumerate(vocabulary.tokens)
        if token is not None and ids.get(token) != index
    ]
    if wrong:
        shown = ", ".join(f"{t!r} at {got} (planned {want})" for t, want, got in wrong[:5])
        raise MergeFailed(
            f"the output tokenizer does not put {len(wrong)} token(s) where their rows were "
            f"aligned: {shown}; this tokenizer ({type(tokenizer).__name__}) cannot take a union "
            'here; use tokenizer = "base" or a model\'s'
        )
    before = set(directory.iterdir())
    tokenizer.save_pretrained(str(directory))
    return sorted(set(directory.iterdir()) - before)


def write_support_files(
    plan: MergePlan, directory: Path, cancel: threading.Event | None = None
) -> list[Path]:
    """Write config.json (dtype updated), tokenizer files, the model card and the recipe copy.
    (``cancel`` only ends a test's pause here: the caller checks it once the files are written.)"""
    written = []
    config = dict(plan.files_from.checkpoint.config)
    dtype_keys = [key for key in ("dtype", "torch_dtype") if key in config] or ["torch_dtype"]
    for key in dtype_keys:
        config[key] = plan.out_dtype
    config.update(plan.config_updates)  # an output made of slices: its layer count and lists
    config_path = directory / "config.json"
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    written.append(config_path)
    pause_point("support-files", cancel)
    source_dir = plan.files_from.checkpoint.directory
    vocabulary = plan.vocabulary
    built = vocabulary is not None and vocabulary.builds_tokenizer
    if built:
        assert vocabulary is not None
        written += write_tokenizer(vocabulary, source_dir, directory)
    for name in SUPPORT_FILES:
        source = source_dir / name
        if source.is_file() and not (built and name in TOKENIZER_FILES):
            shutil.copyfile(source, directory / name)
            written.append(directory / name)
    if plan.chat_template is not None:
        written += write_chat_template(directory, plan.chat_template)
    recipe_path = directory / RECIPE_FILE
    recipe_path.write_text(recipe_to_toml(plan.recipe, absolute_paths=True), encoding="utf-8")
    written.append(recipe_path)
    card_path = directory / "README.md"
    card_path.write_text(model_card(plan), encoding="utf-8")
    written.append(card_path)
    return written


def _span(first: int, last: int) -> str:
    return str(first) if first == last else f"{first}-{last}"


def layer_spans(plan: MergePlan) -> list[tuple[str, str]]:
    """The output layers of a merge of slices, one row per slice: ``("0-23", "./a 0-23")``, or
    several sources joined by `` + `` when the slice merges them."""
    rows: list[tuple[str, str]] = []
    for index in range(len(plan.recipe.slices)):
        origins = [o for o in plan.layers if o.slice_index == index]
        if not origins:
            continue
        span = _span(origins[0].layer, origins[-1].layer)
        parts = [
            f"{model} {_span(first, last)}"
            for (model, first), (_, last) in zip(
                origins[0].sources, origins[-1].sources, strict=True
            )
        ]
        how = "" if len(parts) == 1 else f" ({plan.recipe.method})"
        rows.append((span, " + ".join(parts) + how))
    return rows


def model_card(plan: MergePlan) -> str:
    """A Hugging Face model card: YAML front matter, what was merged and how, and the recipe."""
    recipe = plan.recipe
    hub_refs = [s.ref.repo_id for s in plan.sources if s.ref.repo_id]
    front = ["---"]
    if hub_refs:
        front.append("base_model:")
        front += [f"- {ref}" for ref in dict.fromkeys(hub_refs)]
    front += [
        "library_name: transformers",
        "tags:",
        "- merge",
        "- mergetui",
        f"- {recipe.method}",
        "---",
        "",
    ]
    lines = [
        f"# Merged model ({recipe.method})",
        "",
        f"This model was made with mergetui {__version__} using the **{recipe.method}** method: "
        f"{plan.method.summary}",
        "",
        "## Sources",
        "",
        "| role | model | LoRA | parameters |",
        "| --- | --- | --- | --- |",
    ]
    for source in plan.sources:
        params = ""
        lora = source.lora.label if source.lora else ""
        if source.role.startswith("models["):
            entry = recipe.models[int(source.role.split("[")[1].rstrip("]"))]
            params = ", ".join(f"{k} = {v}" for k, v in entry.parameters.items())
        lines.append(f"| {source.role} | `{source.ref.text}` | {lora} | {params} |")
    if plan.layers:
        lines += ["", "## Layers", "", "| output layers | from |", "| --- | --- |"]
        lines += [f"| {span} | {origin} |" for span, origin in layer_spans(plan)]
    global_params = ", ".join(f"{k} = {v}" for k, v in recipe.parameters.items()) or "none"
    lines += [
        "",
        "## How it was merged",
        "",
        f"- method parameters: {global_params}",
        f"- output dtype: {plan.out_dtype}; all merge arithmetic was done in float32",
        f"- config, tokenizer and chat template from: `{plan.files_from.ref.text}`",
    ]
    if recipe.base and plan.method.uses_base:
        lines.append("- the base took part in the merge arithmetic")
    elif recipe.base:
        lines.append(f"- the base only supplied the architecture ({recipe.method} does not use it)")
    vocabulary = plan.vocabulary
    if vocabulary is not None and vocabulary.tokens and not vocabulary.identity:
        added = len(vocabulary.new_tokens)
        lines.append(
            f"- vocabulary: tokenizer = {vocabulary.setting}, {vocabulary.size} tokens in "
            f"{vocabulary.rows} embedding rows"
            + (f" ({added} added to its tokenizer)" if added else "")
            + f"; rows aligned by token, missing_tokens = {vocabulary.missing_rule}"
        )
    if vocabulary is not None and vocabulary.tied_changed:
        state = "tied to" if vocabulary.out_tied else "separate from"
        lines.append(f"- output head {state} the embedding (merge.tie_word_embeddings)")
    if recipe.chat_template is not None:
        shown = recipe.chat_template if len(recipe.chat_template) < 40 else "a Jinja template"
        lines.append(f"- chat template: {shown} (merge.chat_template)")
    if plan.method.randomized:
        lines.append(
            f"- seed: {recipe.seed} (each tensor's random mask is derived from the seed and "
            "the tensor name, so the result is reproducible on any device)"
        )
    lines += [
        "",
        "## Recipe",
        "",
        "Replay with `mergetui run mergetui.toml` (the same recipe is saved next to the weights):",
        "",
        "```toml",
        recipe_to_toml(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(front + lines)
