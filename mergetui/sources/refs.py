"""Model references: a local directory, or a Hub id ``org/name`` with an optional ``@revision``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_HUB_ID_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """Where a model comes from. Exactly one of ``local_path`` and ``repo_id`` is set."""

    text: str
    local_path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def __str__(self) -> str:
        return self.text


def parse_ref(text: str, base_dir: Path) -> ModelRef:
    """Decide whether ``text`` is a local path or a Hub id.

    A path that exists (relative to ``base_dir``), or that is written like a path (``./x``, ``/x``,
    ``~/x``, ``../x``), is local; otherwise ``org/name[@rev]`` is a Hub id. Anything else is treated as
    a local path, so that the "not found" error names the place that was looked at.
    """
    candidate = Path(text).expanduser()
    local = candidate if candidate.is_absolute() else base_dir / candidate
    looks_like_path = text.startswith((".", "/", "~")) or "\\" in text
    if looks_like_path or local.exists():
        return ModelRef(text=text, local_path=local)
    match = _HUB_ID_RE.match(text)
    if match:
        return ModelRef(text=text, repo_id=match.group("repo"), revision=match.group("rev"))
    return ModelRef(text=text, local_path=local)


def parse_hub_id(text: str) -> ModelRef | None:
    """``org/name[@rev]`` as a Hub reference, or None when ``text`` is not written like one."""
    match = _HUB_ID_RE.match(text.strip())
    if not match:
        return None
    return ModelRef(text=text, repo_id=match.group("repo"), revision=match.group("rev"))
