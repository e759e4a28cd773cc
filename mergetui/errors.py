"""Error types shared by every layer.

Each error carries the exit code the CLI maps it to, so that scripts can tell a bad recipe (2) from a
merge that broke half-way (1) without parsing text.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_MERGE_FAILED = 1
EXIT_INVALID = 2
EXIT_INTERRUPTED = 130


class MergeTuiError(Exception):
    """Base class: a problem the user can act on, with a message that says how."""

    exit_code = EXIT_MERGE_FAILED


class RecipeError(MergeTuiError):
    """The recipe is malformed or asks for something invalid. Raised before any weight is read."""

    exit_code = EXIT_INVALID

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f"{path}: " if path else ""
        if len(self.problems) == 1:
            text = f"{where}{self.problems[0]}"
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            text = f"{where}{len(self.problems)} problems in the recipe:\n{lines}"
        super().__init__(text)


class SourceError(MergeTuiError):
    """A model, adapter or checkpoint file cannot be found or read."""

    exit_code = EXIT_INVALID


class UsageError(MergeTuiError):
    """Bad command-line input (prompts, task files, options), caught before any model loads."""

    exit_code = EXIT_INVALID


class CompatibilityError(MergeTuiError):
    """The models cannot be merged together (architecture, tensor names, shapes, vocabularies)."""

    exit_code = EXIT_INVALID


class OutputError(MergeTuiError):
    """The output location is unusable (exists without --force, not writable, not enough space)."""

    exit_code = EXIT_INVALID


class MergeFailed(MergeTuiError):
    """The merge started and failed; the partial output has been removed."""

    exit_code = EXIT_MERGE_FAILED


class MergeCancelled(MergeTuiError):
    """The merge was interrupted (Ctrl-C, SIGTERM or a cancel request); nothing was left behind."""

    exit_code = EXIT_INTERRUPTED
