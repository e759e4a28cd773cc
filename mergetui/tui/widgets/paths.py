"""Path completion for the model fields: Tab-free, as-you-type suggestions (→ accepts one)."""

from __future__ import annotations

import os
from pathlib import Path

from textual.suggester import Suggester


class PathSuggester(Suggester):
    """Suggests the rest of a path from what is on disk: the first entry (folders first, each
    ending in ``/``) whose name starts with the last part typed. Relative paths are taken from
    ``base_dir`` (the recipe's folder), as the recipe will take them. Text that does not look
    like a path (a Hub id such as ``org/name``) gets no suggestion unless it exists on disk."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(use_cache=False, case_sensitive=True)
        self.base_dir = base_dir

    async def get_suggestion(self, value: str) -> str | None:
        if not value.startswith(("/", ".", "~")) and not (self.base_dir / value).parent.is_dir():
            return None
        head, slash, prefix = value.rpartition("/")
        typed_folder = head + slash  # as typed, so the suggestion extends the text unchanged
        folder = Path(os.path.expanduser(typed_folder or "."))
        if not folder.is_absolute():
            folder = self.base_dir / folder
        show_hidden = prefix.startswith(".")
        try:
            entries = sorted(
                (not entry.is_dir(), entry.name)
                for entry in os.scandir(folder)
                if entry.name.startswith(prefix) and (show_hidden or not entry.name.startswith("."))
            )
        except OSError:
            return None
        for is_file, name in entries:
            candidate = typed_folder + name + ("" if is_file else "/")
            if candidate != value:
                return candidate
        return None
