"""Rich rendering of plans, method help and live merge progress for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rich.cells import cell_len
from rich.console import Console, JustifyMethod
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

from mergetui.engine.report import (
    estimate_lines,
    full_reference,
    layer_lines,
    report_rows,
    vocabulary_lines,
)
from mergetui.events import Event, PhaseEvent, PlanEvent, TensorEvent
from mergetui.methods.registry import METHODS, MethodSpec
from mergetui.units import format_bytes, format_count, format_duration


@dataclass(frozen=True)
class Column:
    """A column of a list (:func:`print_rows`). ``drop``: 0 keeps it always (the id a user greps
    or copies); 1, 2, … are dropped in that order while the terminal is too narrow. A ``path``
    (longer than any terminal may be) is listed whole under the table rather than in it."""

    header: str
    justify: JustifyMethod = "left"
    drop: int = 0
    path: bool = False


Cell = str | Text


def print_rows(
    console: Console, columns: Sequence[Column], rows: Sequence[Sequence[Cell]], title: str = ""
) -> None:
    """A list of records, every id and path whole: on a terminal a table, piped plain rows.

    An id cut to ``barorg/tiny-…`` can be neither grepped nor copied. Given too little width,
    rich shrinks every column, ``no_wrap`` ones too, so instead the lowest-value columns are
    dropped until every remaining cell fits whole, and paths go under the table, one a line
    (the terminal wraps such a line; the output never breaks it). Piped (``| grep``,
    ``| cut -f1``), and on a terminal too narrow for even the kept columns, each record is one
    line of tab-separated fields in the columns' order, with no title, header or box drawing.
    """
    shown = [i for i, column in enumerate(columns) if not column.path]
    droppable = sorted((c.drop, i) for i, c in enumerate(columns) if c.drop and not c.path)

    def width(kept: list[int]) -> int:  # cells + one space either side + the borders
        return len(kept) + 1 + sum(_column_width(columns[i], rows, i) + 2 for i in kept)

    while console.is_terminal and width(shown) > console.width and droppable:
        shown.remove(droppable.pop(0)[1])
    if not console.is_terminal or width(shown) > console.width:
        for row in rows:
            print("\t".join(_plain(cell).replace("\t", " ").replace("\n", " ") for cell in row))
        return
    if title:
        console.print(Text(title), soft_wrap=True)
    table = Table()
    for index in shown:
        table.add_column(columns[index].header, justify=columns[index].justify, no_wrap=True)
    for row in rows:
        table.add_row(*[row[i] for i in shown])
    console.print(table)
    paths = [i for i, column in enumerate(columns) if column.path]
    label_width = max((len(columns[i].header) for i in paths), default=0)
    for row in rows if paths else []:
        console.print(Text(_plain(row[0])))
        for index in paths:
            line = f"  {columns[index].header + ':':<{label_width + 1}} {_plain(row[index])}"
            console.print(Text(line), soft_wrap=True)


def _plain(cell: Cell) -> str:
    return cell if isinstance(cell, str) else cell.plain


def _column_width(column: Column, rows: Sequence[Sequence[Cell]], index: int) -> int:
    return max([cell_len(column.header), *(cell_len(_plain(row[index])) for row in rows)])


def count_or_unknown(value: int | None) -> str:
    return "?" if value is None else format_count(value)


def render_report(console: Console, report: dict[str, Any]) -> None:
    """The compatibility table (rows from :func:`report_rows`, shared with the TUI), every
    model's full reference and the output once, uncut, then the problems and the estimates."""
    models = report["models"]
    table = Table(title=f"{report['method']} merge", title_justify="left")
    table.add_column("", style="bold", no_wrap=True)
    for model in models:
        table.add_column(model["role"], overflow="fold")
    for row in report_rows(report):
        cells = [
            Text(c, "bold red" if d else "") for c, d in zip(row.cells, row.differs, strict=True)
        ]
        table.add_row(row.label, *cells)
    console.print(table)
    # Lines a terminal wraps but that are never broken in the output: copyable, greppable.
    role_width = max((len(m["role"]) for m in models), default=0)
    console.print("models:")
    for model in models:
        line = f"  {model['role']:<{role_width}}  {full_reference(model)}"
        console.print(Text(line), soft_wrap=True)
    console.print(Text(f"output: {report['output']}"), soft_wrap=True)
    extraction = report.get("extraction") or {}
    if extraction:
        console.print(Text(extraction["summary"]), soft_wrap=True)
    lines = layer_lines(report)
    if lines:
        console.print(Text("output layers (from [[slices]]):"))
        for line in lines:
            console.print(Text(f"  {line}"), soft_wrap=True)
    lines = vocabulary_lines(report)
    if lines:
        console.print(Text("vocabulary:"))
        for line in lines:
            console.print(Text(f"  {line}"), soft_wrap=True)
    for problem in report["problems"]:
        style = "bold red" if problem["severity"] == "error" else "yellow"
        message = Text(f"{problem['severity']}: ", style=style) + Text(problem["message"])
        console.print(message, soft_wrap=True)
    for line in estimate_lines(report):
        console.print(Text(line), soft_wrap=True)
    verdict = "[green]compatible[/green]" if report["ok"] else "[bold red]cannot merge[/bold red]"
    console.print(verdict)


def render_adapter_report(console: Console, report: dict[str, Any]) -> None:
    """An adapter merge's check (:func:`mergetui.engine.lora_steps.adapter_report`): each
    adapter with its weight and rank, what the combination does and the output."""
    console.print(
        Text(f"adapter merge ({report['combination']}): {report['summary']}"), soft_wrap=True
    )
    for adapter in report["adapters"]:
        line = (
            f"  weight {adapter['weight']:<6}  r {adapter['r']}, lora_alpha "
            f"{adapter['lora_alpha']}  {adapter['lora']}"
        )
        console.print(Text(line), soft_wrap=True)
    if report["base"]:
        console.print(Text(f"checked against the base's headers: {report['base']}"), soft_wrap=True)
    console.print(
        Text(
            f"output: {report['output']} (rank {report['rank']}, {report['modules']} modules, "
            f"reads {format_bytes(report['bytes_to_read'])} on {report['device']})"
        ),
        soft_wrap=True,
    )
    console.print("[green]compatible[/green]")


def render_methods(console: Console, only: MethodSpec | None = None) -> None:
    """Every method (or one) with its parameters, straight from the registry."""
    for spec in [only] if only else METHODS.values():
        console.print(f"[bold]{spec.name}[/bold] — {escape(spec.summary)}")
        lines = [f"  when: {spec.when_to_use}"]
        needs = "merge.base + " if spec.needs_base else ""
        lines.append(
            f"  models: {needs}{spec.model_count_text()} under [[models]]"
            + (
                "; merge.base optional (given, the models are merged as task vectors against it)"
                if spec.optional_base
                else ""
            )
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

    def update(self, event: Event) -> None:
        if isinstance(event, PlanEvent):
            self.progress.update(self.task, total=event.tensors_total, completed=0)
        elif isinstance(event, TensorEvent):
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
        elif isinstance(event, PhaseEvent):
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
