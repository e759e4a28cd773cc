"""The base of every step screen: typed access to the app and its draft, and no silent failures.

``Screen.app`` is typed as a plain ``App``, so every screen reaching the draft or the app's
actions needed a ``type: ignore``; :attr:`StepScreen.merge_app` says what the app really is.

A worker's ``Worker.StateChanged`` message goes to the node that started it and does not bubble,
so the app never sees a screen's worker fail. This base forwards every failure to
:meth:`MergeTuiApp.report_worker_error` (one place for the toast, the log and the F2 detail),
then lets the screen leave its busy state through :meth:`StepScreen.worker_failed`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from textual.screen import Screen
from textual.worker import Worker, WorkerState

from mergetui.errors import MergeTuiError

if TYPE_CHECKING:
    from mergetui.tui.app import MergeTuiApp  # the app imports the screens: type-only here
    from mergetui.tui.state import RecipeDraft


def error_text(error: BaseException, *, first_line: bool = True) -> str:
    """An error as the UI shows it. Our own errors (``MergeTuiError``) are written for the user
    and shown as they are; anything else is a bug or an environment problem, so its type is
    named too ("RuntimeError: …")."""
    text = str(error).strip()
    if first_line and text:
        text = text.splitlines()[0]
    if isinstance(error, MergeTuiError):
        return text or type(error).__name__
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class StepScreen(Screen[None]):
    """A step of the wizard (models, check, method, run, compare, sweep)."""

    @property
    def merge_app(self) -> MergeTuiApp:
        """The running app, typed: its draft, its actions and its error reporting."""
        return cast("MergeTuiApp", self.app)

    @property
    def draft(self) -> RecipeDraft:
        """The recipe being built (the app's: it may be replaced, e.g. by a restore)."""
        return self.merge_app.draft

    def on_worker_state_changed(self, event: Worker.StateChanged) -> None:
        """Report a worker's uncaught exception, then let the screen show it where it waited.

        Textual calls this for subclasses too (handlers run along the MRO), so a screen that
        handles ``Worker.StateChanged`` itself cannot turn the report off by accident."""
        worker = event.worker
        if event.state != WorkerState.ERROR or worker.error is None:
            return
        self.merge_app.report_worker_error(worker)
        self.worker_failed(worker, worker.error)

    def worker_failed(self, worker: Worker[Any], error: BaseException) -> None:
        """Leave the state ``worker`` left the screen in ("checking…", "searching…"); the toast,
        the log and F2 are already done. Screens with a busy state override this."""
