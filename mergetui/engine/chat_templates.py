"""The output's chat template, when the recipe sets ``merge.chat_template``.

Without the key the output keeps the template of the model ``merge.tokenizer`` names (its files are
copied). With it:

- ``auto``: the template most of the models share (the first one seen wins a tie; base first, then
  the models in recipe order), as mergekit's ``auto`` does, but in a fixed order;
- ``chatml``: the ChatML format (``<|im_start|>role ... <|im_end|>``);
- a path ending in ``.jinja`` (recipe-relative): that file's text;
- anything else: the Jinja template text itself.

Resolved when the plan is built (files are read, no weight), written with the output.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mergetui.engine.plan import Source
    from mergetui.recipe.schema import Recipe

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILT_IN = {"chatml": CHATML}


def template_of(directory: Path) -> str | None:
    """A model's chat template: ``chat_template.jinja``, else ``chat_template.json``, else the
    ``chat_template`` of ``tokenizer_config.json`` (a dict of named templates gives ``default``)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    for name in ("chat_template.json", "tokenizer_config.json"):
        path = directory / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(value, list):  # [{"name": ..., "template": ...}, ...]
            named = {
                item.get("name"): item.get("template") for item in value if isinstance(item, dict)
            }
            value = named.get("default")
        if isinstance(value, str) and value.strip():
            return value
    return None


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
