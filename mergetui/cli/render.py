"""Rich rendering of plans, method help and live merge progress for the terminal."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from mergetui.engine.progress import ProgressEvent
from mergetui.engine.report import estimate_lines
from mergetui.methods.registry import METHODS, MethodSpec
from mergetui.units import format_bytes, format_count, format_duration


def _short(reference: str, width: int = 28) -> str:
    """A long local path as its last two parts, so the table fits a narrow terminal."""
    if len(reference) <= width or "/" not in reference:
        return reference
    return "…/" + "/".join(reference.rstrip("/").split("/")[-2:])


def count_or_unknown(value: int | None) -> str:
    return "?" if value is None else format_count(value)


def render_report(console: Console, report: dict[str, Any]) -> None:
    """The compatibility table, the problems and the estimates."""
    # One column per model: at 80 columns, eight attributes side by side do not fit, four models do.
    table = Table(title=f"{report['method']} merge → {report['output']}", title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    for row in report["models"]:
        table.add_column(row["role"], overflow="fold")
    rows = report["models"]
    attributes = [
        ("model", [_short(r["model"]) for r in rows]),
        ("architecture", [r["architecture"] for r in rows]),
        ("model_type", [r["model_type"] for r in rows]),
        ("layers", [str(r["layers"]) for r in rows]),
        ("hidden size", [str(r["hidden_size"]) for r in rows]),
        ("vocab size", [str(r["vocab_size"]) for r in rows]),
        ("dtype", [r["dtype"] for r in rows]),
        ("parameters", [count_or_unknown(r["parameters"]) for r in rows]),
        ("size on disk", [format_bytes(r["size_on_disk"]) for r in rows]),
    ]
    if any(r["lora"] for r in rows):
        attributes.insert(1, ("LoRA", [_short(r["lora"]) if r["lora"] else "" for r in rows]))
    must_match = {"architecture", "model_type", "layers", "hidden size", "vocab size"}
    for label, values in attributes:
        if label in must_match:  # highlight what differs from the first model
            values = [v if v == values[0] else f"[bold red]{v}[/bold red]" for v in values]
        table.add_row(label, *values)
    console.print(table)
    for problem in report["problems"]:
        style = "bold red" if problem["severity"] == "error" else "yellow"
        console.print(Text(f"{problem['severity']}: ", style=style) + Text(problem["message"]))
    for line in estimate_lines(report):
        console.print(line)
    verdict = "[green]compatible[/green]" if report["ok"] else "[bold red]cannot merge[/bold red]"
    console.print(verdict)


def render_methods(console: Console, only: MethodSpec | None = None) -> None:
    """Every method (or one) with its parameters, straight from the registry."""
    for spec in [only] if only else METHODS.values():
        console.print(f"[bold]{spec.name}[/bold] — {escape(spec.summary)}")
        lines = [f"  when: {spec.when_to_use}"]
        needs = "merge.base + " if spec.needs_base else ""
        lines.append(
            f"  models: {needs}{spec.model_count_text()} under [[models]]"
            + ("; randomised (uses merge.seed)" if spec.randomized else "")
        )
        for param in spec.params:
            default = "required" if param.required else f"default {param.default!r}"
            where = "per model" if param.scope == "model" else "[merge.parameters]"
            rng = f" in {param.range_text()}" if param.range_text() else ""
            lines.append(
                f"  - {param.name} ({param.kind.__name__}{rng}, {default}, {where}): {param.help}"
            )
        lines += [f"  note: {note}" for note in spec.notes]
        console.print(escape("\n".join(lines)) + "\n", soft_wrap=True)


class _Throughput(ProgressColumn):
    def render(self, task: Task) -> Text:
        rate = task.fields.get("rate", 0.0)
        return Text(f"{rate / 1e6:.0f} MB/s", style="cyan")


class _Eta(ProgressColumn):
    def render(self, task: Task) -> Text:
        return Text(f"ETA {format_duration(task.fields.get('eta'))}", style="magenta")


class _Memory(ProgressColumn):
    def render(self, task: Task) -> Text:
        text = f"RAM {format_bytes(task.fields.get('rss', 0))}"
        gpu = task.fields.get("gpu")
        if gpu is not None:
            text += f" VRAM {format_bytes(gpu)}"
        return Text(text, style="green")


class ProgressView:
    """A rich progress bar fed by engine events."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            BarColumn(bar_width=24),
            MofNCompleteColumn(),
            _Throughput(),
            TimeElapsedColumn(),
            _Eta(),
            _Memory(),
            console=console,
            transient=False,
        )
        self.task = self.progress.add_task(
            "merge", total=None, rate=0.0, eta=None, rss=0, gpu=None, name=""
        )

    def __enter__(self) -> ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def update(self, event: ProgressEvent) -> None:
        if event.event in ("plan", "tensor"):
            self.progress.update(
                self.task,
                total=event.tensors_total,
                completed=event.tensors_done,
                rate=event.throughput_bytes_s,
                eta=event.eta_s,
                rss=event.rss_bytes,
                gpu=event.gpu_bytes,
                name=event.tensor_name[-48:],
            )
        elif event.event == "phase":
            self.progress.update(self.task, name=event.message)


class DownloadView:
    """Byte progress bars for Hub downloads, one per model, shown only once a download starts
    (a model found in the cache shows nothing)."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> DownloadView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def update(self, progress: Any) -> None:
        task = self._tasks.get(progress.repo_id)
        if task is None:
            task = self._tasks[progress.repo_id] = self._progress.add_task(
                f"downloading {progress.repo_id}", total=progress.bytes_total
            )
        self._progress.update(task, completed=progress.bytes_done, total=progress.bytes_total)
