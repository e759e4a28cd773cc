"""Step 4: the merge, run by ``mergetui run --json`` as a background job and monitored here.

A separate process means a crash, an OOM kill or a CUDA error in the merge cannot take the UI
down, and Cancel is a SIGTERM, which the CLI handles like Ctrl-C: the partial output is removed.
The job is detached from the terminal (:mod:`mergetui.jobs`), so it survives a dropped SSH session
and the next ``mergetui`` reattaches to it. The screen only reads the JSON progress events the CLI
writes (the same ones scripts get).

The same screen runs the LoRA jobs of a recipe: an adapter merge (``[adapters]``: no ``plan``
event, its progress counts the adapter's tensors, and at the end the adapter's folder and size),
and a model merge with ``output.lora_rank``, whose stream goes on after the merge's ``phase``
with the extraction's tensors (shown as the extraction phase), an ``extracted`` event (the
adapter's rank, folder and size, shown at the end) and the one ``done``.
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any

from rich.markup import escape
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import Button, Footer, Header, Label, Log, ProgressBar, Sparkline, Static
from textual.worker import Worker

from mergetui.events import (
    CancelledEvent,
    DoneEvent,
    DownloadEvent,
    ErrorEvent,
    ExtractedEvent,
    GpuUse,
    PhaseEvent,
    PlanEvent,
    ProgressEvent,
)
from mergetui.gpus import GpuReading, read_gpus
from mergetui.jobs import FAILED, RUNNING, Job, start_job
from mergetui.tui.screens.base import StepScreen, error_text
from mergetui.units import format_bytes, format_duration


class RunScreen(StepScreen):
    """Watches one background job: a new one started from the draft, or one found again (the UI
    was closed or the SSH session dropped while it ran). Polls the job's event file at 5 Hz, so a
    flood of events never floods the UI."""

    BINDINGS = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("ctrl+t", "app.compare", "Compare", show=True),
        Binding("ctrl+n", "app.compare", "Compare", show=False),
    ]
    POLL_S = 0.2
    HELP = """\
## 4 · Run

The merge runs as `mergetui run RECIPE --json` in a background process: a crash, an out-of-memory
kill or a CUDA error there cannot take this screen down. Progress (tensors, the current tensor,
MB/s, elapsed, ETA), RAM and VRAM with their history, and the log update five times a second.

**Cancel merge** stops it within a second or two and removes the partial output.
If the SSH connection drops, or you quit with Ctrl+Q → Detach, the merge keeps running; run
`mergetui` again and it reattaches here. When it is done, **Ctrl+T** compares the merge with its
parents.
"""

    def __init__(self, job: Job | None = None) -> None:
        super().__init__()
        self.job = job
        self.reattached = job is not None
        self.outcome = "starting"
        self.events_read_to = 0
        self.rss_history: list[float] = []
        self.vram_history: list[float] = []
        self.gpu_readings: list[GpuReading] | None = None  # every GPU, from the driver
        self.merge_gpus: list[GpuUse] | None = None  # the merge's GPU, from its events
        self.merge_event: ProgressEvent | None = None
        self.gpu_timer: Timer | None = None  # samples nvidia-smi while the merge runs
        #: the job is an adapter merge (its recipe says ``[adapters]``): no model to compare
        self.adapter_merge = False
        #: ``merge``, then ``extract`` once tensors come after a phase (output.lora_rank)
        self.stage = "merge"
        self._after_phase = False
        self.extracted: ExtractedEvent | None = None
        self.done: DoneEvent | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="run-step"):
            yield Label("4 · Run: the merge runs in its own process, and outlives this screen")
            yield Static("starting…", id="run-status")
            yield ProgressBar(id="run-progress", show_eta=False)
            yield Static("", id="run-figures")
            with Horizontal(classes="row"):
                yield Static("RAM ", classes="meter-label")
                yield Sparkline([], id="ram-history", classes="meter")
            with Horizontal(classes="row", id="vram-row"):
                yield Static("VRAM", classes="meter-label")
                yield Sparkline([], id="vram-history", classes="meter")
            yield Static("VRAM: no GPU in use", id="vram")
            with Horizontal(classes="row"):
                yield Button("Cancel merge", id="cancel", variant="error")
                yield Button("Compare (ctrl+t)", id="compare", disabled=True)
            yield Log(id="run-log", max_lines=500)
        yield Footer()

    def on_mount(self) -> None:
        if self.job is None:
            self.job = self._start()
            if self.job is None:
                return
        elif self.job is not self.merge_app.watched_job:
            started = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.job.started))
            self.query_one("#run-log", Log).write_line(
                f"reattached to the merge started {started} (job {self.job.folder.name})"
            )
        self.merge_app.watched_job = self.job
        self.adapter_merge = _is_adapter_recipe(self.job)
        self.outcome = "running"
        self.poll()
        self.set_interval(self.POLL_S, self.poll, name="job-poll")
        if shutil.which("nvidia-smi"):  # every GPU of the server, once a second
            self.gpu_timer = self.set_interval(1.0, self.sample_gpus, name="gpu-poll")

    def _start(self) -> Job | None:
        from mergetui.errors import MergeTuiError
        from mergetui.recipe import recipe_to_toml

        try:
            recipe = self.draft.to_recipe()
        except MergeTuiError as exc:
            self._finish("invalid", str(exc))
            return None
        job = start_job(recipe_to_toml(recipe, absolute_paths=True), str(recipe.output_dir))
        self.query_one("#run-log", Log).write_line(
            f"$ mergetui run {job.recipe_file} --json   (job folder {job.folder})"
        )
        return job

    def poll(self) -> None:
        """Show the events written since the last poll; finish once the job has ended."""
        if self.job is None or self.outcome not in ("starting", "running"):
            return
        outcome = self.job.outcome()  # read before the events, so none is missed at the end
        events, self.events_read_to = self.job.read_events(self.events_read_to)
        log = self.query_one("#run-log", Log)
        latest_progress = None
        for event in events:
            if isinstance(event, PlanEvent):
                log.write_line(
                    f"plan: {event.method} on {event.device}, {event.tensors_total} tensors "
                    f"→ {event.output}"
                )
                self.query_one("#run-progress", ProgressBar).update(total=event.tensors_total)
            elif isinstance(event, (PhaseEvent, CancelledEvent, ErrorEvent)):
                log.write_line(f"{event.kind}: {event.message}")
                self._after_phase = isinstance(event, PhaseEvent)
            elif isinstance(event, DoneEvent):
                self.done = event
                log.write_line(f"done: {event.output}")
            elif isinstance(event, ExtractedEvent):
                self.extracted = event
                log.write_line(
                    f"extracted: a rank-{event.rank} LoRA adapter of "
                    f"{format_bytes(event.adapter_bytes)} → {event.output}"
                )
            elif isinstance(event, ProgressEvent) and self._after_phase and self.stage == "merge":
                # a tensor after the merge's phases: the extraction (output.lora_rank) has begun
                self.stage = "extract"
                log.write_line("extracting the LoRA adapter of (merged − base)…")
            if isinstance(event, DownloadEvent):
                self.query_one("#run-status", Static).update(
                    f"downloading {event.repo_id}: {format_bytes(event.bytes_done)} of "
                    f"{format_bytes(event.bytes_total)}"
                )
            elif isinstance(event, ProgressEvent):
                latest_progress = event
                self._record(event)
        if latest_progress is not None:  # only the newest matters: the UI is redrawn once
            self._show(latest_progress)
        if outcome.state != RUNNING:
            self.job.mark_seen()
            stderr = self.job.stderr_text().strip()
            if stderr and outcome.state == FAILED:
                log.write_line(stderr)
            self._finish(outcome.state, outcome.message)

    @work(
        thread=True,
        exclusive=True,
        group="gpus",
        exit_on_error=False,
        description="reading the GPUs (nvidia-smi)",
    )
    def sample_gpus(self) -> None:
        if self.outcome not in ("starting", "running"):
            return
        readings = read_gpus()
        self.app.call_from_thread(self._show_gpus, readings)

    def _show_gpus(self, readings: list[GpuReading] | None) -> None:
        self.gpu_readings = readings
        merge_index = self.merge_gpus[0].index if self.merge_gpus else None
        if readings:
            mine = next((g for g in readings if g.index == merge_index), readings[0])
            self.vram_history = [*self.vram_history[-59:], float(mine.used_bytes)]
            self.query_one("#vram-row").display = True
            self.query_one("#vram-history", Sparkline).data = self.vram_history
        self._show_vram()

    def _show_vram(self) -> None:
        """One line per GPU: the driver's view of all of them when nvidia-smi answers, else the
        merge's own GPU from its events, else that there is none."""
        event = self.merge_event
        holds = (
            f"; this merge holds {format_bytes(event.gpu_bytes)} (peak "
            f"{format_bytes(event.gpu_peak_bytes or 0)})"
            if event is not None and event.gpu_bytes is not None
            else ""
        )
        merge_index = self.merge_gpus[0].index if self.merge_gpus else None
        if self.gpu_readings:
            lines = [
                f"GPU {g.index} {g.name}: {format_bytes(g.used_bytes)} of "
                f"{format_bytes(g.total_bytes)} in use"
                + ("" if g.utilization_percent is None else f", {g.utilization_percent}% busy")
                + (f" ← the merge{holds}" if g.index == merge_index else "")
                for g in self.gpu_readings
            ]
        elif self.merge_gpus:
            lines = [
                f"GPU {g.index} {g.name}: {format_bytes(g.used_bytes)} of "
                f"{format_bytes(g.total_bytes)} in use{holds}"
                for g in self.merge_gpus
            ]
        else:
            lines = ["VRAM: no GPU in use"]
        self.query_one("#vram", Static).update("\n".join(lines))

    def _record(self, event: ProgressEvent) -> None:
        """Every event goes into the meters' history, even those not drawn one by one."""
        self.rss_history = [*self.rss_history[-59:], float(event.rss_bytes)]
        if event.gpus and not self.gpu_readings:  # the driver's readings, when there, make it
            self.vram_history = [*self.vram_history[-59:], float(event.gpus[0].used_bytes)]

    def _show(self, event: ProgressEvent) -> None:
        bar = self.query_one("#run-progress", ProgressBar)
        bar.update(total=event.tensors_total, progress=event.tensors_done)
        eta = event.eta_s
        what = "extracting the LoRA adapter: " if self.stage == "extract" else ""
        self.query_one("#run-status", Static).update(
            f"{what}{event.tensors_done}/{event.tensors_total} tensors · {event.tensor_name}"
        )
        self.query_one("#run-figures", Static).update(
            f"{format_bytes(event.throughput_bytes_s)}/s · elapsed "
            f"{format_duration(event.elapsed_s)} · ETA "
            f"{'?' if eta is None else format_duration(eta)} · RAM {format_bytes(event.rss_bytes)}"
            f" (peak {format_bytes(event.peak_rss_bytes)})"
        )
        self.query_one("#ram-history", Sparkline).data = self.rss_history
        self.merge_event = event
        if event.gpus:
            self.merge_gpus = event.gpus
            self.query_one("#vram-row").display = True
            self.query_one("#vram-history", Sparkline).data = self.vram_history
        self._show_vram()

    def _finish(self, outcome: str, message: str) -> None:
        self.outcome = outcome
        colour = {"done": "green", "cancelled": "yellow"}.get(outcome, "red")
        adapter = self._adapter_line() if outcome == "done" else ""
        self.query_one("#run-status", Static).update(
            f"[b {colour}]{outcome}[/]: {message}" + (f"\n{escape(adapter)}" if adapter else "")
        )
        # nothing left to cancel: the button goes, and a finished merge leads on to Compare (not
        # an adapter merge's: compare runs models)
        self.query_one("#cancel", Button).display = False
        compare = self.query_one("#compare", Button)
        compare.disabled = outcome != "done" or self.adapter_merge
        bar = self.query_one("#run-progress", ProgressBar)
        if outcome == "done":
            self.merge_app.mark_saved()  # the output holds mergetui.toml
            if not self.adapter_merge:
                compare.variant = "success"
                compare.focus()
            if bar.total:
                bar.update(progress=bar.total)
        self.app.notify(
            message.splitlines()[0],
            title=outcome,
            severity="information" if outcome == "done" else "warning",
        )

    def _adapter_line(self) -> str:
        """The LoRA adapter a finished job made: the extracted one (output.lora_rank), or the
        adapter merge's output; "" for a plain model merge."""
        if self.extracted is not None:
            event = self.extracted
            return (
                f"LoRA adapter (rank {event.rank}, {format_bytes(event.adapter_bytes)}): "
                f"{event.output}"
            )
        if self.adapter_merge and self.done is not None:
            return f"LoRA adapter ({format_bytes(self.done.bytes_written)}): {self.done.output}"
        return ""

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        if self.job is not None and self.outcome == "running":
            self.job.cancel()
            self.query_one("#run-log", Log).write_line("cancel requested (SIGTERM)")

    @on(Button.Pressed, "#compare")
    def compare(self) -> None:
        self.merge_app.action_compare()

    def worker_failed(self, worker: Worker[Any], error: BaseException) -> None:
        """A GPU sampler that broke once would break every second: stop it (the app has
        reported it once) and go on with the merge's own GPU figures from its events."""
        if worker.group == "gpus" and self.gpu_timer is not None:
            self.gpu_timer.stop()
            self.gpu_timer = None
            self.query_one("#run-log", Log).write_line(
                f"cannot read the GPUs through nvidia-smi ({error_text(error)}); VRAM shows the "
                "merge's own GPU from its progress events"
            )


def _is_adapter_recipe(job: Job) -> bool:
    """Whether a job runs an adapter merge: its recipe has ``[adapters]`` (read as TOML, cheap)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib

    try:
        return "adapters" in tomllib.loads(job.recipe_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
