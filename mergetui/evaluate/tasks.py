"""Task files: JSONL prompt/answer rows scored by exact match or containment, or plain text scored
by perplexity. Read and checked before any model is loaded; errors name the file and line."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from mergetui.errors import UsageError

MATCH_MODES = ("exact", "contains")


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    match: str = "exact"


@dataclass
class Task:
    """A named task: ``examples`` (kind "answers") or ``text`` (kind "perplexity")."""

    name: str
    path: Path
    kind: str
    examples: list[Example] = field(default_factory=list)
    text: str = ""

    @property
    def higher_is_better(self) -> bool:
        return self.kind == "answers"

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "answers" else "perplexity"


def parse_task_option(option: str, kind: str, base_dir: Path | None = None) -> Task:
    """``name=path`` from ``--task`` or ``--text``; a relative path is taken from ``base_dir``
    when given (the TUI's recipe folder), else from the working folder."""
    name, sep, path = option.partition("=")
    if not sep or not name.strip() or not path.strip():
        flag = "--task" if kind == "answers" else "--text"
        raise UsageError(f"{flag} {option!r}: write it as NAME=FILE, e.g. {flag} math=math.jsonl")
    file = Path(path.strip()).expanduser()
    if base_dir is not None and not file.is_absolute():
        file = base_dir / file
    if kind == "answers":
        return load_answer_task(name.strip(), file)
    return load_text_task(name.strip(), file)


def load_answer_task(name: str, path: Path) -> Task:
    if not path.is_file():
        raise UsageError(f"task {name}: file not found: {path}")
    examples = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise UsageError(f"{where}: not valid JSON ({exc.args[0]})") from exc
        if not isinstance(row, dict):
            raise UsageError(
                f'{where}: each line must be an object like {{"prompt": ..., "answer": ...}}'
            )
        missing = [k for k in ("prompt", "answer") if not isinstance(row.get(k), str)]
        if missing:
            raise UsageError(f"{where}: needs string field(s) {', '.join(missing)}")
        match = row.get("match", "exact")
        if match not in MATCH_MODES:
            raise UsageError(
                f"{where}: match must be one of {', '.join(MATCH_MODES)}, not {match!r}"
            )
        examples.append(Example(row["prompt"], row["answer"], match))
    if not examples:
        raise UsageError(f"task {name}: {path} has no rows")
    return Task(name, path, "answers", examples=examples)


def load_text_task(name: str, path: Path) -> Task:
    if not path.is_file():
        raise UsageError(f"text {name}: file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UsageError(f"text {name}: {path} is empty")
    return Task(name, path, "perplexity", text=text)


def is_correct(example: Example, generated: str) -> bool:
    answer, text = example.answer.strip(), generated.strip()
    if example.match == "contains":
        return answer in text
    return text == answer
