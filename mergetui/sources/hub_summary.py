"""A Hub model's details as labelled lines, for ``mergetui hub info`` and the TUI's models step.

Both show the same facts before anything is downloaded; the wording lives here once, as plain
strings (no rich or Textual objects), and each UI only styles the lines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from mergetui.units import format_bytes

if TYPE_CHECKING:
    from mergetui.sources.hub import RepoInfo

#: Needed files named in the summary line; the rest are counted (`hub info` lists them all).
NAMED_FILES = 6


@dataclass(frozen=True)
class InfoRow:
    """One line of a model's details; ``warning`` lines are the ones to read before merging."""

    label: str
    text: str
    warning: bool = False


def info_rows(info: RepoInfo) -> list[InfoRow]:
    """The model's id, revision and full commit (ids are never shortened: they are copied into
    recipes), what it is, its weights and the files a merge would download."""
    kind = "LoRA adapter" if info.is_adapter else ", ".join(info.architectures) or "?"
    size = format_bytes(info.weight_bytes) if info.weight_bytes is not None else "size unknown"
    needed = info.needed_files()
    named = ", ".join(needed[:NAMED_FILES])
    more = len(needed) - NAMED_FILES
    rows = [
        InfoRow("model", f"{info.repo_id} @ {info.revision} → commit {info.commit}"),
        InfoRow("architecture", f"{kind} (model_type {info.model_type or '?'})"),
        InfoRow(
            "weights",
            f"{info.weight_format}, {size}" if info.weight_format else "none found",
        ),
        InfoRow(
            "files",
            f"{len(info.files)}; a merge downloads {len(needed)}: {named}"
            + (f" and {more} more" if more > 0 else ""),
        ),
    ]
    if info.is_adapter:
        rows.append(
            InfoRow(
                "adapter",
                f"for base model {info.adapter_base or '?'}: add it as the LoRA of a model",
            )
        )
    if info.needs_custom_code:
        rows.append(
            InfoRow(
                "custom code",
                "config.json names custom code (auto_map): mergetui never runs it (no "
                "trust_remote_code); merging works only if transformers knows the architecture",
                warning=True,
            )
        )
    return rows
