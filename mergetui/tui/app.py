"""The Textual app, built by a factory the tests reuse. Imports no torch: screens import the
engine inside their workers, so the first screen is up before any heavy module loads.

The app owns what every screen shares: the recipe being built (``draft``, autosaved as it
changes and offered back at the next start), the merge and the sweep jobs being watched (found
again after a dropped SSH session), the sweep form as last typed, the last error's detail (F2),
and the keys that work everywhere: F1 help, Ctrl+P command palette, Escape back, Ctrl+Q quit
(asking first while a merge or a sweep runs).
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.worker import Worker, WorkerState

from mergetui.jobs import RUNNING, SWEEP, Job, job_to_reattach
from mergetui.logs import setup_logging
from mergetui.tui.screens.adapter_method import AdapterMethodScreen
from mergetui.tui.screens.base import error_text
from mergetui.tui.screens.check import CheckScreen
from mergetui.tui.screens.compare import CompareScreen
from mergetui.tui.screens.dialogs import ChoiceScreen, ErrorScreen, HelpScreen
from mergetui.tui.screens.method import MethodScreen
from mergetui.tui.screens.models import ModelsScreen
from mergetui.tui.screens.run import RunScreen
from mergetui.tui.screens.sweep import SweepScreen
from mergetui.tui.screens.sweep_monitor import SweepMonitorScreen
from mergetui.tui.state import RecipeDraft
from mergetui.tui.sweep_form import SweepForm

log = logging.getLogger("mergetui.tui")

APP_HELP = """\
# mergetui

A merge in six steps: **1 Models** → **2 Check** → **3 Method** → **4 Run** → **5 Compare** →
**6 Sweep** (many variants of the recipe merged and scored, the best kept); **save** the recipe
(Ctrl+S in step 3) to replay it headless with `mergetui run`.

| key | does |
|---|---|
| F1 | this help, for the step you are on |
| F2 | the full detail of the last error (the toast shows one line) |
| Ctrl+P | command palette: jump to any step, save, help |
| Ctrl+N | next step |
| Escape | back one step |
| Ctrl+Q | quit (while a merge runs: detach and leave it running, or cancel it) |

A merge or a sweep runs in the background and survives a dropped SSH connection: start
`mergetui` again and it reattaches. The recipe you are building is autosaved and offered back if the app
ends before you saved it.
"""


class MergeTuiApp(App[None]):
    CSS_PATH = "mergetui.tcss"
    TITLE = "mergetui"
    SUB_TITLE = "guided model merging"
    BINDINGS = [
        Binding("f1", "help", "Help", show=True),
        Binding("f2", "error_detail", "Error detail"),
    ]
    AUTOSAVE_S = 2.0

    def __init__(self, draft: RecipeDraft | None = None, *, offer_restore: bool = False) -> None:
        super().__init__()
        self.draft = draft or RecipeDraft()
        self.offer_restore = offer_restore
        self.watched_job: Job | None = None
        self.watched_sweep: Job | None = None
        #: the sweep step's fields as last typed (a second visit shows them again)
        self.sweep_form: SweepForm | None = None
        self.last_error: tuple[str, str] | None = None
        self._autosaved = ""
        self.log_path: Path | None = None

    def on_mount(self) -> None:
        self.log_path = setup_logging()
        self.push_screen(ModelsScreen())
        job = job_to_reattach()
        if job is not None and self.offer_restore:  # a plain start: back to where the user was
            self._reattach(job)
        elif job is not None and job.outcome().state == RUNNING:
            # `mergetui open RECIPE` keeps the recipe it was asked to open; the running job is
            # still watched, so its step shows it and Ctrl+Q asks before leaving
            if job.kind == SWEEP:
                self.watched_sweep = job
                self.notify(f"a sweep into {job.output} is running: Sweep (step 6) shows it")
            else:
                self.watched_job = job
                self.notify(f"a merge into {job.output} is running: Run (ctrl+r) shows it")
        elif self.offer_restore:
            self._offer_restore()
        self._autosaved = self._draft_state()
        self.set_interval(self.AUTOSAVE_S, self.autosave, name="autosave")

    # -- state kept across sessions ------------------------------------------------------------
    def _draft_state(self) -> str:
        return repr(self.draft.to_data())

    def autosave(self) -> None:
        """Write the draft when it has changed (cheap: a small JSON file)."""
        state = self._draft_state()
        if state != self._autosaved and not self.draft.is_empty:
            try:
                self.draft.autosave()
            except OSError as exc:
                self.report_error("cannot autosave the recipe", exc)
            self._autosaved = state

    def mark_saved(self) -> None:
        """The draft is safe in a recipe file (or a finished merge's ``mergetui.toml``): nothing
        to offer back until it changes again."""
        RecipeDraft.discard_autosave()
        self._autosaved = self._draft_state()

    def _offer_restore(self) -> None:
        saved = RecipeDraft.load_autosave()
        if saved is None:
            return
        if saved.is_adapter_merge:
            names = ", ".join(a.lora for a in saved.adapters) or "none"
            what = f"adapter merge ({saved.combination}), adapters: {names}"
        else:
            names = ", ".join(m.model for m in saved.models) or (
                f"{len(saved.slices)} slice(s)" if saved.slices else "no models"
            )
            what = f"method {saved.method}, base {saved.base or '(none)'}, models: {names}"
        question = f"Restore the recipe you were building last time?\n\n{what}"

        def answer(choice: str | None) -> None:
            if choice == "restore":
                self.draft = saved
                # the models screen shows it in place: switching screens races Textual's Header,
                # whose title watcher on the screen being removed then finds no HeaderTitle
                if isinstance(self.screen, ModelsScreen):
                    self.screen.show_draft()
                else:
                    self.switch_screen(ModelsScreen())
                self.notify("restored the autosaved recipe")
            else:
                RecipeDraft.discard_autosave()

        self.push_screen(
            ChoiceScreen(question, [("restore", "Restore"), ("discard", "Start afresh")]), answer
        )

    def _reattach(self, job: Job) -> None:
        """Show a merge or a sweep found running (or finished unseen) and load its recipe (a
        sweep's starting recipe) as the draft."""
        from mergetui.errors import MergeTuiError
        from mergetui.recipe import load_any_recipe

        try:
            self.draft = RecipeDraft.from_recipe(load_any_recipe(job.recipe_file))
        except MergeTuiError as exc:
            self.report_error(f"cannot read the recipe of {job.folder}", exc)
        if job.kind == SWEEP:
            self.push_screen(SweepMonitorScreen(job))
        else:
            self.push_screen(RunScreen(job))
        self.notify(f"reattached to the {job.kind} into {job.output}", title=f"{job.kind} found")

    # -- steps ---------------------------------------------------------------------------------
    def action_check(self) -> None:
        """A fresh check of the current draft (the draft may have changed since the last one)."""
        self.push_screen(CheckScreen())

    def action_method(self) -> None:
        """The method step of the draft's kind: merge methods, or adapter combination types."""
        if self.draft.is_adapter_merge:
            self.push_screen(AdapterMethodScreen())
        else:
            self.push_screen(MethodScreen())

    def action_run(self) -> None:
        """Start the merge; while one runs, show it again instead (one merge at a time)."""
        job = self.watched_job
        if job is not None and job.outcome().state == RUNNING:
            self.push_screen(RunScreen(job))
            self.notify("a merge is running: here it is (cancel it to start another)")
            return
        self.push_screen(RunScreen())

    def action_compare(self) -> None:
        if self.draft.is_adapter_merge:  # the compare step loads models, not a lone adapter
            self.notify(
                "compare runs models side by side; load the merged adapter on its base with "
                "PEFT, or fold it in with a model merge (lora = ...)",
                severity="warning",
            )
            return
        self.push_screen(CompareScreen())

    def action_models(self) -> None:
        self.push_screen(ModelsScreen())

    def action_sweep(self) -> None:
        """The sweep form for the current draft; while a sweep runs, that sweep instead."""
        job = self.watched_sweep
        if job is not None and job.outcome().state == RUNNING:
            self.push_screen(SweepMonitorScreen(job))
            self.notify("a sweep is running: here it is (cancel it to start another)")
            return
        if self.draft.is_adapter_merge:
            self.notify(
                "a sweep merges and scores variants of a model merge; switch step 1 to "
                "Merge models",
                severity="warning",
            )
            return
        self.push_screen(SweepScreen())

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Step 1: models", "Choose the base and the models", self.action_models)
        yield SystemCommand(
            "Step 2: check", "Check compatibility (headers only)", self.action_check
        )
        yield SystemCommand("Step 3: method", "Method, parameters, output", self.action_method)
        yield SystemCommand("Step 4: run", "Run the merge in the background", self.action_run)
        yield SystemCommand("Step 5: compare", "Prompts and quick eval", self.action_compare)
        yield SystemCommand(
            "Step 6: sweep", "Merge and score many variants, keep the best", self.action_sweep
        )
        yield SystemCommand("Help", "Keys and steps (F1)", self.action_help)
        yield SystemCommand(
            "Last error", "The full detail of the last error (F2)", self.action_error_detail
        )

    # -- help and errors -------------------------------------------------------------------------
    def action_help(self) -> None:
        if isinstance(self.screen, (HelpScreen, ErrorScreen)):
            return
        text = getattr(self.screen, "HELP", "")
        self.push_screen(HelpScreen(f"{text}\n\n{APP_HELP}" if text else APP_HELP))

    def report_error(self, summary: str, exc: BaseException) -> None:
        """One line in a toast (see ``error_text``); the traceback in the log and behind F2."""
        detail = "".join(traceback.format_exception(exc))
        log.error("%s: %s\n%s", summary, exc, detail)
        self.last_error = (f"{summary}: {error_text(exc)}", detail)
        self.notify(
            f"{self.last_error[0]}  (F2: detail)", severity="error", timeout=10, markup=False
        )

    def report_worker_error(self, worker: Worker[object]) -> None:
        """The one place a failed background task is reported, whichever screen started it (each
        step screen forwards its workers' failures here, see ``StepScreen``): named by the
        worker's ``description`` ("the compatibility check failed: …")."""
        if worker.error is None:
            return
        what = worker.description or worker.name or "a background task"
        self.report_error(f"{what} failed", worker.error)

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """The app's own workers (a screen's go to the screen, which forwards them)."""
        if event.state == WorkerState.ERROR:
            self.report_worker_error(event.worker)

    def action_error_detail(self) -> None:
        if self.last_error is None:
            self.notify("no error so far")
            return
        if not isinstance(self.screen, ErrorScreen):
            summary, detail = self.last_error
            where = str(self.log_path) if self.log_path else "(the log folder is not writable)"
            self.push_screen(ErrorScreen(summary, detail, where))

    # -- quitting --------------------------------------------------------------------------------
    async def action_quit(self) -> None:
        """Quit; while a merge or a sweep runs, ask whether to leave it running (detach) or
        cancel it."""
        running = [
            job
            for job in (self.watched_job, self.watched_sweep)
            if job is not None and job.outcome().state == RUNNING
        ]
        if not running:
            self._exit_saving()
            return

        def answer(choice: str | None) -> None:
            if choice == "cancel":
                for job in running:
                    job.cancel()
                self._exit_saving()
            elif choice == "detach":
                self._exit_saving(
                    "; ".join(
                        f"the {job.kind} into {job.output} keeps running (job folder {job.folder})"
                        for job in running
                    )
                    + "; run mergetui again to reattach"
                )

        what = " and a ".join(job.kind for job in running)
        self.push_screen(
            ChoiceScreen(
                f"A {what} {'is' if len(running) == 1 else 'are'} running. Leave "
                f"{'it' if len(running) == 1 else 'them'} running in the background (run mergetui "
                f"again to reattach), or cancel {'it' if len(running) == 1 else 'them'}?",
                [("detach", "Detach"), ("cancel", f"Cancel {what}"), ("stay", "Stay")],
            ),
            answer,
        )

    def _exit_saving(self, message: str | None = None) -> None:
        self.autosave()
        self.exit(message=message)


def create_app(base_dir: Path | None = None, draft: RecipeDraft | None = None) -> MergeTuiApp:
    """The app with ``draft`` (``mergetui open``) or an empty one whose relative paths resolve
    against ``base_dir``; an empty one offers back the recipe autosaved by an earlier session."""
    if draft is not None:
        return MergeTuiApp(draft)
    return MergeTuiApp(RecipeDraft(base_dir=base_dir or Path.cwd()), offer_restore=True)
