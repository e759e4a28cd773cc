"""A model's own chat template, read from its files (no tokenizer is loaded)."""

from __future__ import annotations

import json
from pathlib import Path


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
