"""Step 4: the merge, run by ``mergetui run --json`` in a child process and monitored here.

A separate process means a crash, an OOM kill or a CUDA error in the merge cannot take the UI
down, and Cancel is a SIGTERM, which the CLI handles like Ctrl-C: the partial output is removed.
The screen only reads the JSON progress events the CLI prints (the same ones scripts get).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Label, Log, ProgressBar, Sparkline, Static

from mergetui.units import format_bytes


class RunScreen(Screen[None]):
    BINDINGS = [Binding("escape", "app.pop_screen", "Back")]

    def __init__(self) -> None:
        super().__init__()
        self.process: asyncio.subprocess.Process | None = None
        self.outcome = "starting"
        self.cancel_requested = False
        self.rss_history: list[float] = []

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="run-step"):
            yield Label("4 · Run: the merge runs in its own process")
            yield Static("starting…", id="run-status")
            yield ProgressBar(id="run-progress", show_eta=False)
            yield Static("", id="run-figures")
            with Horizontal(classes="row"):
                yield Static("RAM", id="ram-label")
                yield Sparkline([], id="ram-history")
            yield Static("", id="vram")
            yield Button("Cancel", id="cancel", variant="error")
            yield Log(id="run-log", max_lines=500)
        yield Footer()

    def on_mount(self) -> None:
        self.start()

    @work(exclusive=True, group="merge", exit_on_error=False)
    async def start(self) -> None:
        from mergetui.errors import MergeTuiError
        from mergetui.recipe import recipe_to_toml

        draft = self.app.draft  # type: ignore[attr-defined]
        log = self.query_one("#run-log", Log)
        try:
            recipe = draft.to_recipe()
        except MergeTuiError as exc:
            self._finish("invalid", str(exc))
            return
        folder = Path(tempfile.mkdtemp(prefix="mergetui-run-"))
        recipe_file = folder / "recipe.toml"
        recipe_file.write_text(recipe_to_toml(recipe, absolute_paths=True), encoding="utf-8")
        command = [sys.executable, "-m", "mergetui", "run", str(recipe_file), "--json"]
        log.write_line("$ " + " ".join(command[1:]))
        self.process = await asyncio.create_subprocess_exec(
            *command,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        self.outcome = "running"
        assert self.process.stdout is not None and self.process.stderr is not None
        async for raw in self.process.stdout:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("{"):
                self._show(json.loads(line))
        errors = (await self.process.stderr.read()).decode("utf-8", "replace").strip()
        code = await self.process.wait()
        shutil.rmtree(folder, ignore_errors=True)
        if code == 0:
            self._finish("done", f"merged into {recipe.output_dir}")
        elif code in (130, -signal.SIGTERM) or self.cancel_requested:
            # a SIGTERM that lands before the CLI installs its handler ends it with another code;
            # either way the CLI had written nothing yet, or removed its partial output
            self._finish("cancelled", f"cancelled (exit code {code}); no partial output is left")
        else:
            self._finish("failed", errors.splitlines()[0] if errors else f"exit code {code}")
        if errors:
            log.write_line(errors)

    def _show(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        log = self.query_one("#run-log", Log)
        if kind in ("plan", "phase", "cancelled", "error", "done") and event.get("message"):
            log.write_line(f"{kind}: {event['message']}")
        if kind == "download":
            self.query_one("#run-status", Static).update(
                f"downloading {event['repo_id']}: {format_bytes(event['bytes_done'])} of "
                f"{format_bytes(event['bytes_total'])}"
            )
            return
        if "tensors_total" not in event:
            return
        bar = self.query_one("#run-progress", ProgressBar)
        bar.update(total=event["tensors_total"], progress=event["tensors_done"])
        eta = event.get("eta_s")
        self.query_one("#run-status", Static).update(
            f"{event['tensors_done']}/{event['tensors_total']} tensors · {event.get('tensor_name') or ''}"
        )
        self.query_one("#run-figures", Static).update(
            f"{event['throughput_bytes_s'] / 1e6:.0f} MB/s · elapsed {event['elapsed_s']:.1f} s · "
            f"ETA {'?' if eta is None else f'{eta:.1f} s'} · RAM {format_bytes(event['rss_bytes'])}"
        )
        self.rss_history = [*self.rss_history[-59:], float(event["rss_bytes"])]
        self.query_one("#ram-history", Sparkline).data = self.rss_history
        gpu = event.get("gpu_bytes")
        self.query_one("#vram", Static).update(
            "VRAM: no GPU in use"
            if gpu is None
            else f"VRAM {format_bytes(gpu)} (peak {format_bytes(event['gpu_peak_bytes'])})"
        )

    def _finish(self, outcome: str, message: str) -> None:
        self.outcome = outcome
        colour = {"done": "green", "cancelled": "yellow"}.get(outcome, "red")
        self.query_one("#run-status", Static).update(f"[b {colour}]{outcome}[/]: {message}")
        self.query_one("#cancel", Button).disabled = True
        self.app.notify(
            message.splitlines()[0],
            title=outcome,
            severity="information" if outcome == "done" else "warning",
        )

    @on(Button.Pressed, "#cancel")
    def cancel(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.cancel_requested = True
            self.process.send_signal(signal.SIGTERM)
            self.query_one("#run-log", Log).write_line("cancel requested (SIGTERM)")
