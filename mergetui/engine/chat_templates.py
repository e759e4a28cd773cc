"""The output's chat template, when the recipe sets ``merge.chat_template``.

Without the key the output keeps the template of the model ``merge.tokenizer`` names (its files are
copied). With it:

- ``auto``: the template most of the models share (the first one seen wins a tie; base first, then
  the models in recipe order), as mergekit's ``auto`` does, but in a fixed order;
- ``base`` / ``models[i]``: that model's own template;
- ``chatml``: the ChatML format (``<|im_start|>role ... <|im_end|>``);
- ``llama3``: Llama 3's format (``<|start_header_id|>role<|end_header_id|> ... <|eot_id|>``);
- a path ending in ``.jinja`` (recipe-relative): that file's text;
- anything else: the Jinja template text itself.

Resolved when the plan is built (files are read, no weight), written with the output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from mergetui.recipe.vocab import model_index
from mergetui.sources.chat_template import template_of

if TYPE_CHECKING:
    from mergetui.engine.plan import Source
    from mergetui.recipe.schema import Recipe

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
#: Llama 3's header/turn format: each message is ``<|start_header_id|>role<|end_header_id|>``, a
#: blank line, the content and ``<|eot_id|>``, after ``<|begin_of_text|>``.
LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
BUILT_IN = {"chatml": CHATML, "llama3": LLAMA3}


def resolve_chat_template(recipe: Recipe, sources: list[Source]) -> tuple[str | None, list[str]]:
    """The template to write (None: keep the copied one) and warnings for the plan."""
    setting = recipe.chat_template
    if setting is None:
        return None, []
    if setting == "auto":
        found = [t.strip() for s in sources if (t := template_of(s.checkpoint.directory))]
        if not found:
            return None, [
                "merge.chat_template = auto: none of the models has a chat template; the output "
                "keeps the tokenizer source's files as they are"
            ]
        counts = Counter(found)
        best = max(counts.values())
        return next(t for t in found if counts[t] == best), []
    if setting in BUILT_IN:
        return BUILT_IN[setting], []
    if setting == "base" or model_index(setting) is not None:
        role = "base" if setting == "base" else setting
        source = next((s for s in sources if s.role == role), None)
        if source is None or source.checkpoint.remote:
            return None, [
                f"merge.chat_template = {setting}: its files are not here yet; checked "
                "when the model is downloaded"
            ]
        template = template_of(source.checkpoint.directory)
        if template is None:
            have = [
                s.role
                for s in sources
                if not s.checkpoint.remote and template_of(s.checkpoint.directory)
            ]
            hint = f"; {', '.join(have)} has one" if have else ""
            raise ValueError(
                f"merge.chat_template = {setting}: {source.label} has no chat template "
                f"(no chat_template.jinja, nor one in tokenizer_config.json){hint}; choose "
                "another model, chatml, llama3 or a .jinja file"
            )
        return template, []
    if setting.endswith(".jinja"):
        return recipe.resolve_path(setting).read_text(encoding="utf-8"), []
    return setting, []


def write_chat_template(directory: Path, template: str) -> list[Path]:
    """Put ``template`` in the output: ``chat_template.jinja`` (which transformers prefers), and in
    the copied ``tokenizer_config.json``/``chat_template.json`` where they hold one, so no stale
    template is left to disagree with it."""
    written = [directory / "chat_template.jinja"]
    written[0].write_text(template, encoding="utf-8")
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = directory / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        if "chat_template" in data:
            data["chat_template"] = template
            path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return written
