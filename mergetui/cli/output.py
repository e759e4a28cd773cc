"""What every command shares: the consoles, and one way to fail (one line, log file, exit code)."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

from mergetui import __version__
from mergetui.errors import EXIT_INTERRUPTED, EXIT_MERGE_FAILED, MergeTuiError
from mergetui.events import CancelledEvent, DownloadEvent, ErrorEvent, Event, StartEvent

log = logging.getLogger("mergetui.cli")
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)
#: Where this process logs (set by ``main``), named in failure messages.
log_path: list[Path] = []
_print_lock = threading.Lock()

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON (lines).")]


def emit(event: Event) -> None:
    """One event as one JSON line on stdout (``--json``). Downloads report from several threads:
    the lock keeps each line whole."""
    line = event.to_json()
    with _print_lock:
        print(line, flush=True)


def start_stream(command: str) -> None:
    """The first line of every ``--json`` event stream: the schema it follows."""
    emit(StartEvent(version=__version__, command=command))


def fail(message: str, code: int, *, as_json: bool = False) -> NoReturn:
    """Report a failure as one line (and, with ``--json``, as the stream's terminal event)."""
    if as_json:
        terminal = CancelledEvent if code == EXIT_INTERRUPTED else ErrorEvent
        emit(terminal(message=message, exit_code=code))
    # escaped: messages name TOML tables such as [output], which Rich would take for markup
    err_console.print(f"[bold red]error:[/bold red] {escape(message)}", soft_wrap=True)
    if code == EXIT_MERGE_FAILED and log_path:
        err_console.print(f"details: {log_path[0]}")
    raise typer.Exit(code)


@contextmanager
def guard(as_json: bool = False) -> Iterator[None]:
    """Map every failure to a one-line message, the log file and the documented exit code."""
    try:
        yield
    except MergeTuiError as exc:
        log.error("%s", exc, exc_info=exc.exit_code == EXIT_MERGE_FAILED)
        fail(str(exc), exc.exit_code, as_json=as_json)
    except KeyboardInterrupt:
        log.warning("interrupted")
        fail("interrupted", EXIT_INTERRUPTED, as_json=as_json)
    except typer.Exit:
        raise
    except Exception as exc:
        log.exception("unexpected error")
        fail(f"unexpected {type(exc).__name__}: {exc}", EXIT_MERGE_FAILED, as_json=as_json)


def print_download_event(progress: Any) -> None:
    """A Hub download's progress (a ``DownloadProgress``) as a ``download`` event."""
    emit(
        DownloadEvent(
            repo_id=progress.repo_id,
            bytes_done=progress.bytes_done,
            bytes_total=progress.bytes_total,
            files_total=progress.files_total,
            elapsed_s=progress.elapsed_s,
            eta_s=progress.eta_s,
        )
    )


@contextmanager
def signals_stop_the_merge(*, ignore_after: bool) -> Iterator[threading.Event]:
    """While a merge streams, SIGINT and SIGTERM set the returned flag, and the merge stops at
    its next safe point (between tensors, before the output is renamed into place), joins its
    threads, removes its partial output and raises ``MergeCancelled`` (exit code 130).

    Raising ``KeyboardInterrupt`` from the handler instead, wherever the main thread happens to
    be, once landed while the loader thread was being started, outside the block that stops it;
    that thread then ran into interpreter shutdown inside torch and the process died of SIGABRT
    (exit -6) instead of 130. With ``ignore_after`` the signals stay ignored once the merge is
    over: its output is in place (exit 0) or its failure is being reported; otherwise the
    previous handlers come back (``mergetui demo`` goes on to score the merge).
    """
    cancel = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield cancel  # signal handlers belong to the main thread; a caller there sets the flag
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {number: signal.getsignal(number) for number in signals}

    def request_stop(signum: int, frame: object) -> None:
        cancel.set()

    for number in signals:
        signal.signal(number, request_stop)
    try:
        yield cancel
    finally:
        for number in signals:
            restored = previous[number] if previous[number] is not None else signal.SIG_DFL
            signal.signal(number, signal.SIG_IGN if ignore_after else restored)
